"""A Google Cloud Storage stand-in on 127.0.0.1, run as its own process by the test fixtures.

Two servers:
- the emulator (``gcp-storage-emulator``, the JSON API over plain HTTP), which TensorStore and
  the Python clients reach directly (``TENSORSTORE_GCS_HTTP_URL``, ``STORAGE_EMULATOR_HOST``);
- a loopback HTTPS proxy for TensorFlow's GCS filesystem (``tf.io.gfile``, ``tf.summary``,
  TFDS, ``TFRecordDataset``), whose endpoint is fixed to www.googleapis.com: its curl is sent
  through ``https_proxy``, and the proxy terminates the tunnel with a certificate of a throwaway
  CA (``CURL_CA_BUNDLE``) and hands the bytes to the emulator. Tunnels to any other host are
  refused and logged, so nothing leaves the machine.

Run: ``python -m tests.storage.gcs_server STATE_DIR``; prints one JSON line with the ports,
serves until stdin closes. Buckets named ``no-access*`` answer every request with 403.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import select
import socket
import ssl
import sys
import threading
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from gcp_storage_emulator import server as emulator
from gcp_storage_emulator.handlers import objects

GOOGLE_HOSTS = ("www.googleapis.com", "storage.googleapis.com")
FORBIDDEN_BUCKET_PREFIX = "no-access"


def _make_certificates(state_dir: str) -> tuple[str, str]:
  """A CA (written to ``ca.pem``) and a certificate it signs for :data:`GOOGLE_HOSTS`."""
  now = datetime.datetime.now(datetime.timezone.utc)
  valid = dict(not_valid_before=now - datetime.timedelta(days=1),
               not_valid_after=now + datetime.timedelta(days=7))
  ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
  ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mrcnn_jax test CA")])
  ca = (x509.CertificateBuilder(subject_name=ca_name, issuer_name=ca_name, serial_number=1,
                                public_key=ca_key.public_key(), **valid)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256()))
  leaf = (x509.CertificateBuilder(
      subject_name=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, GOOGLE_HOSTS[0])]),
      issuer_name=ca_name, serial_number=2, public_key=key.public_key(), **valid)
          .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in GOOGLE_HOSTS]),
                         critical=False)
          .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
  ca_path, leaf_path = os.path.join(state_dir, "ca.pem"), os.path.join(state_dir, "leaf.pem")
  with open(ca_path, "wb") as f:
    f.write(ca.public_bytes(serialization.Encoding.PEM))
  with open(leaf_path, "wb") as f:
    f.write(leaf.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
  return ca_path, leaf_path


def _pipe(a: socket.socket, b: socket.socket) -> None:
  try:
    while True:
      readable, _, _ = select.select([a, b], [], [], 300)
      if not readable:
        return
      for s in readable:
        data = s.recv(1 << 16)
        if not data:
          return
        (b if s is a else a).sendall(data)
  except OSError:
    return
  finally:
    a.close()
    b.close()


class TlsProxy:
  """An HTTP proxy on 127.0.0.1 that serves :data:`GOOGLE_HOSTS` from the emulator."""

  def __init__(self, emulator_port: int, state_dir: str):
    ca, leaf = _make_certificates(state_dir)
    self.ca_path = ca
    self._tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    self._tls.load_cert_chain(leaf)
    self._emulator_port = emulator_port
    self._refused_log = os.path.join(state_dir, "refused.log")
    self._sock = socket.create_server(("127.0.0.1", 0), backlog=128)
    self.port = self._sock.getsockname()[1]
    threading.Thread(target=self._serve, daemon=True).start()

  def _serve(self) -> None:
    while True:
      conn, _ = self._sock.accept()
      threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

  def _refuse(self, conn: socket.socket, request_line: str) -> None:
    with open(self._refused_log, "a") as f:
      f.write(request_line + "\n")
    conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
    conn.close()

  def _handle(self, conn: socket.socket) -> None:
    head = b""
    while b"\r\n\r\n" not in head:
      chunk = conn.recv(4096)
      if not chunk:
        conn.close()
        return
      head += chunk
    request_line, rest = head.split(b"\r\n", 1)
    method, target, version = request_line.decode("latin-1").split(" ", 2)
    upstream = socket.create_connection(("127.0.0.1", self._emulator_port))
    if method == "CONNECT":  # https://host:443/...: a TLS tunnel
      if target.rsplit(":", 1)[0] not in GOOGLE_HOSTS:
        upstream.close()
        return self._refuse(conn, request_line.decode("latin-1"))
      conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
      conn = self._tls.wrap_socket(conn, server_side=True)
      if rest.split(b"\r\n\r\n", 1)[1]:
        raise RuntimeError("bytes after CONNECT")
    else:  # http://host/path: the emulator's own upload URLs
      url = urlsplit(target)
      if url.hostname not in GOOGLE_HOSTS:
        upstream.close()
        return self._refuse(conn, request_line.decode("latin-1"))
      path = url.path + (f"?{url.query}" if url.query else "")
      upstream.sendall(f"{method} {path} {version}\r\n".encode("latin-1") + rest)
    _pipe(conn, upstream)


def _patch_emulator() -> None:
  """Five gaps of the emulator: a download carries no ``x-goog-generation`` header (TensorStore
  reads the object's generation from it); it never answers ``Expect: 100-continue`` (curl then waits a
  second before every upload's body); a body sent with both ``Transfer-Encoding: chunked`` and a
  ``Content-Length`` (TensorFlow's uploads) is read by its length, chunk framing and all; an
  empty upload body (TensorFlow's directory markers) arrives as ``None``; and there are no
  permissions: buckets named ``no-access*`` answer 403."""
  read_raw_data = emulator._read_raw_data  # pylint: disable=protected-access

  def _read_raw_data(handler):
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
      del handler.headers["Content-Length"]  # RFC 9112 6.3: the transfer coding wins
    return read_raw_data(handler)

  emulator._read_raw_data = _read_raw_data  # pylint: disable=protected-access
  parse_request = emulator.RequestHandler.parse_request

  def _parse_request(self):
    ok = parse_request(self)
    if ok and self.headers.get("Expect", "").lower() == "100-continue":
      self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
      self.wfile.flush()
    return ok

  emulator.RequestHandler.parse_request = _parse_request
  media_upload = objects._media_upload  # pylint: disable=protected-access

  def _media_upload(request, response, storage):
    if request.data is None:
      request._data = b""  # pylint: disable=protected-access
    return media_upload(request, response, storage)

  objects._media_upload = _media_upload  # pylint: disable=protected-access
  handle = emulator.Router.handle

  def _handle(self, method):
    path = urlsplit(self._request_handler.path).path  # pylint: disable=protected-access
    parts = path.split("/")
    bucket = parts[parts.index("b") + 1] if "b" in parts[:-1] else ""
    if bucket.startswith(FORBIDDEN_BUCKET_PREFIX):
      body = json.dumps({"error": {"code": 403, "message": "Forbidden"}}).encode()
      h = self._request_handler  # pylint: disable=protected-access
      h.send_response(403)
      h.send_header("Content-Type", "application/json")
      h.send_header("Content-Length", str(len(body)))
      h.end_headers()
      h.wfile.write(body)
      return
    return handle(self, method)

  emulator.Router.handle = _handle

  download = objects.download

  def _download(request, response, storage, *args, **kwargs):
    download(request, response, storage, *args, **kwargs)
    if response.status in (200, 206):
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      response["x-goog-generation"] = obj["generation"]
      response["x-goog-metageneration"] = obj["metageneration"]

  objects.download = _download  # objects.get(alt=media) calls it
  for _, handlers in emulator.HANDLERS:
    for method, handler in list(handlers.items()):
      if handler is download:
        handlers[method] = _download


def main(state_dir: str) -> None:
  logging.basicConfig(level=logging.WARNING)
  logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)  # 404s are normal here
  _patch_emulator()
  server = emulator.create_server("127.0.0.1", 0, in_memory=True)
  server.start()
  port = server._api._httpd.server_address[1]  # pylint: disable=protected-access
  proxy = TlsProxy(port, state_dir)
  print(json.dumps({"emulator_port": port, "proxy_port": proxy.port, "ca": proxy.ca_path}),
        flush=True)
  sys.stdin.read()  # until the fixture closes the pipe (or dies)
  server.stop()


if __name__ == "__main__":
  main(sys.argv[1])
