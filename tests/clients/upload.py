"""Uploads a file with tuspy, as tests/tests/tus_clients.rs asks:

    .venv/bin/python upload.py ENDPOINT KEY FILE CHUNK_SIZE [sync|async]

Each chunk carries `Upload-Checksum: sha1 ...` (tuspy's checksum support). Prints one JSON
line: {"url": the upload URL, "offset": the last Upload-Offset, "uploadId": the
Upgate-Upload-Id header of the last answer}. On error, prints it on stderr and exits 1.
"""

import asyncio
import json
import os
import sys

from tusclient.client import TusClient
from tusclient.exceptions import TusCommunicationError, TusUploadFailed


def main() -> int:
    if len(sys.argv) not in (5, 6):
        print(__doc__, file=sys.stderr)
        return 2
    endpoint, key, path, chunk_size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    mode = sys.argv[5] if len(sys.argv) == 6 else "sync"
    client = TusClient(endpoint, headers={"Authorization": f"Bearer {key}"})
    options = dict(
        file_path=path,
        chunk_size=chunk_size,
        metadata={"filename": os.path.basename(path), "filetype": "application/octet-stream"},
        upload_checksum=True,
    )
    try:
        if mode == "async":
            uploader = client.async_uploader(**options)
            asyncio.run(uploader.upload())
        else:
            uploader = client.uploader(**options)
            uploader.upload()
    except (TusCommunicationError, TusUploadFailed) as error:
        print(
            f"tuspy: {error!r}: status {error.status_code}, body {error.response_content!r}",
            file=sys.stderr,
        )
        return 1
    headers = {name.lower(): value for name, value in uploader.request.response_headers.items()}
    print(
        json.dumps(
            {"url": uploader.url, "offset": uploader.offset, "uploadId": headers.get("upgate-upload-id")}
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
