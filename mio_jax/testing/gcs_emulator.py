"""``python -m mio_jax.testing.gcs_emulator start ...``: ``gcp-storage-emulator`` with GCS's
object generations and preconditions, for tests (``mio_jax.testing.GcsEmulator``).

The emulator keeps a generation per object but ignores the preconditions that name one
(``ifGenerationMatch``, ``ifGenerationNotMatch``, ``ifMetagenerationMatch``,
``ifMetagenerationNotMatch``) and sends no ``x-goog-generation`` header with object
bytes. tensorstore (Orbax's array I/O: OCDBT manifests) relies on both: it revalidates a
cached manifest with ``ifGenerationNotMatch`` and expects 304 Not Modified, and it
writes manifests with ``ifGenerationMatch``. Without them a process's second checkpoint
fails with "Malformed StorageGeneration". This wraps the emulator's object handlers with
the real service's behaviour (304 / 412, generation headers) and starts it with the same
command line. The server handles one request at a time, so a check and the write it
guards are atomic.
"""

from __future__ import annotations

import sys
from http import HTTPStatus


def _condition(request, name: str):
    values = request.query.get(name)
    return values[0] if values else None


def _precondition_status(request, obj) -> HTTPStatus | None:
    """304 / 412 when a precondition of the request fails against ``obj`` (None: absent)."""
    gen = obj["generation"] if obj else "0"
    meta = obj["metageneration"] if obj else None
    match = _condition(request, "ifGenerationMatch")
    if match is not None and match != gen:
        return HTTPStatus.PRECONDITION_FAILED
    not_match = _condition(request, "ifGenerationNotMatch")
    if not_match is not None and not_match == gen:
        return HTTPStatus.NOT_MODIFIED if request.method == "GET" else (
            HTTPStatus.PRECONDITION_FAILED)
    meta_match = _condition(request, "ifMetagenerationMatch")
    if meta_match is not None and meta_match != meta:
        return HTTPStatus.PRECONDITION_FAILED
    meta_not_match = _condition(request, "ifMetagenerationNotMatch")
    if meta_not_match is not None and meta is not None and meta_not_match == meta:
        return HTTPStatus.NOT_MODIFIED if request.method == "GET" else (
            HTTPStatus.PRECONDITION_FAILED)
    return None


def _fail(response, status: HTTPStatus) -> None:
    response.status = status
    if status == HTTPStatus.PRECONDITION_FAILED:
        response.json({"error": {"code": 412, "message": "Precondition Failed",
                                 "errors": [{"domain": "global",
                                             "reason": "conditionNotMet",
                                             "message": "Precondition Failed"}]}})


def patch_handlers() -> None:
    """Wraps the emulator's object handlers (in place, before the server starts)."""
    from gcp_storage_emulator import server
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    def current(storage, bucket, name):
        try:
            return storage.get_file_obj(bucket, name)
        except NotFound:
            return None

    def reading(handler):
        def wrapped(request, response, storage, *args, **kwargs):
            obj = current(storage, request.params["bucket_name"], request.params["object_id"])
            status = _precondition_status(request, obj) if obj is not None else None
            if status is not None:
                return _fail(response, status)
            handler(request, response, storage, *args, **kwargs)
            if obj is not None and response.status in (HTTPStatus.OK,
                                                        HTTPStatus.PARTIAL_CONTENT):
                response["x-goog-generation"] = obj["generation"]
                response["x-goog-metageneration"] = obj["metageneration"]
                if obj.get("size") is not None:
                    response["x-goog-stored-content-length"] = str(obj["size"])
        return wrapped

    def writing(handler, name_of):
        def wrapped(request, response, storage, *args, **kwargs):
            name = name_of(request)
            if name is not None:
                obj = current(storage, request.params["bucket_name"], name)
                status = _precondition_status(request, obj)
                if status is not None:
                    return _fail(response, status)
            return handler(request, response, storage, *args, **kwargs)
        return wrapped

    def upload_name(request):
        if "upload_id" in request.query:  # a chunk of an upload checked when it began
            return None
        if "name" in request.query:
            return request.query["name"][0]
        data = request.data
        if isinstance(data, dict):
            return (data.get("meta") or {}).get("name") or data.get("name")
        return None

    wrapped = {
        objects.download: reading(objects.download),
        objects.get: reading(objects.get),
        objects.insert: writing(objects.insert, upload_name),
        objects.delete: writing(objects.delete, lambda r: r.params["object_id"]),
    }
    for _, handlers in server.HANDLERS:
        for method, handler in list(handlers.items()):
            if handler in wrapped:
                handlers[method] = wrapped[handler]
    # ``get`` with alt=media calls ``download`` by its module name: route it through the
    # wrapped one too (its preconditions were already checked, and are checked again
    # against the same object, which is harmless).
    objects.download = wrapped[objects.download]
    # Uploads POSTed to ".../o" without the /upload prefix fall back to objects.insert.
    objects.insert = wrapped[objects.insert]


def main(argv=None) -> None:
    patch_handlers()
    from gcp_storage_emulator.__main__ import main as emulator_main

    emulator_main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
