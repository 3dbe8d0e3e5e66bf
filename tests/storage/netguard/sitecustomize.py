"""Logs every attempt of this Python process to reach a non-loopback address (a connect, or a
name lookup of anything but localhost) to ``$MRCNN_TEST_NETGUARD_LOG``; the storage fixture
puts this folder first on ``PYTHONPATH`` of the processes it starts and fails if the log is
not empty. (TensorFlow's and TensorStore's C++ clients are held to loopback by their endpoint
variables and the proxy, see conftest.py.)"""

import ipaddress
import os
import socket
import sys

_LOG_VAR = "MRCNN_TEST_NETGUARD_LOG"
_LOCAL_NAMES = {None, "", "localhost", "localhost.localdomain", "ip6-localhost"}


def _is_loopback(host) -> bool:
  if isinstance(host, bytes):
    host = host.decode()
  if host in _LOCAL_NAMES:
    return True
  try:
    return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
  except ValueError:
    return False


def _record(what: str) -> None:
  log = os.environ.get(_LOG_VAR)  # read each time: the test process unsets it when done
  if not log:
    return
  with open(log, "a") as f:
    f.write(f"pid {os.getpid()} {' '.join(sys.argv[:2])}: {what}\n")


def _hook(event, args):
  if event == "socket.connect":
    sock, address = args
    if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0]):
      _record(f"connect {address}")
  elif event == "socket.getaddrinfo" and not _is_loopback(args[0]):
    _record(f"getaddrinfo {args[0]!r}")


def install() -> None:
  sys.addaudithook(_hook)


if os.environ.get(_LOG_VAR):
  install()
