"""Endpoint mistakes: a URL without a scheme, TLS spoken to a plain-HTTP port.

The TLS case runs against a local TCP server that answers every connection in plain
HTTP and counts the connections: such a setup can never work, so it must fail at once
(one botocore attempt, the CRT's few quick retries), not after minutes of backoff.
"""

import socket
import threading

import boto3
import pytest

from nipype_s3.exceptions import ConfigurationError, S3Error
from nipype_s3.s3.listing import list_objects
from nipype_s3.s3.session import check_endpoint_url, make_s3_client


@pytest.mark.parametrize("url, message", [
    ("127.0.0.1:9000", "S3 endpoint '127.0.0.1:9000' is not an http:// or https:// URL (did "
                       "you mean 'http://127.0.0.1:9000' or 'https://127.0.0.1:9000'?). Set "
                       "endpoint_url (or AWS_ENDPOINT_URL) to the server's URL, e.g. "
                       "'http://127.0.0.1:9000'."),
    ("minio.lab:9000", "S3 endpoint 'minio.lab:9000' is not an http:// or https:// URL (did "
                       "you mean 'http://minio.lab:9000'"),
    ("ftp://minio.lab", "S3 endpoint 'ftp://minio.lab' is not an http:// or https:// URL. "),
    ("http://", "S3 endpoint 'http://' is not an http:// or https:// URL. "),
])
def test_an_endpoint_that_is_not_a_url_is_named(url, message):
    with pytest.raises(ConfigurationError) as err:
        make_s3_client(boto3.Session(), endpoint_url=url)
    assert str(err.value).startswith(message)


@pytest.mark.parametrize("url", ["http://127.0.0.1:9000", "https://s3.lab.example:443/",
                                 "HTTPS://minio.lab"])
def test_http_and_https_urls_are_endpoints(url):
    assert check_endpoint_url(url) == url


class _PlainHTTP:
    """A TCP server that answers anything with a plain-HTTP 400 and counts connections."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            try:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n"
                             b"Connection: close\r\n\r\n")
            except OSError:
                pass
            finally:
                conn.close()

    def close(self):
        self.sock.close()


@pytest.fixture
def plain_http():
    server = _PlainHTTP()
    yield server
    server.close()


def test_tls_to_a_plain_http_port_fails_at_once_and_says_what_to_check(plain_http):
    client = make_s3_client(boto3.Session(), endpoint_url=f"https://127.0.0.1:{plain_http.port}")
    with pytest.raises(S3Error) as err:
        list_objects(client, "bucket", "prefix/")
    text = str(err.value)
    assert text.startswith(f"TLS failed with the S3 endpoint at https://127.0.0.1:"
                           f"{plain_http.port} while trying to list s3://bucket/prefix/: ")
    assert "If the server speaks plain HTTP, use an http:// endpoint_url" in text
    assert "AWS_CA_BUNDLE" in text
    # the native engine's first try and its 3 quick retries, then one botocore attempt
    # (without the two limits: 6 CRT connections, then 8 botocore attempts)
    assert plain_http.connections <= 5
