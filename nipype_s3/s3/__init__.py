"""The AWS S3 layer: URIs, credentials, clients and transfers. Never imports nipype.

Every function here takes a boto3 client (or session) as an argument, so tests can
hand in a moto client or a botocore ``Stubber``.
"""

from .credentials import read_creds_file, resolve_session
from .delete import delete_keys
from .download import DownloadItem, download_files
from .listing import ObjectInfo, iter_objects, list_objects
from .session import bucket_region, make_s3_client
from .transfer import TransferSettings, TransferSummary
from .upload import UploadItem, upload_files
from .uri import S3URI, is_s3_uri, join_key, parse_s3_uri

__all__ = [
    "S3URI", "parse_s3_uri", "is_s3_uri", "join_key",
    "read_creds_file", "resolve_session", "make_s3_client", "bucket_region",
    "ObjectInfo", "iter_objects", "list_objects",
    "TransferSettings", "TransferSummary",
    "UploadItem", "upload_files", "DownloadItem", "download_files", "delete_keys",
]
