"""The release tests' servers: the Hub stand-in with upload routes (moto's S3 server is `s3_server` in
tests/conftest.py, shared with the storage tests)."""

from tests.support.hub_upload import hub_uploads  # noqa: F401 (fixture)
