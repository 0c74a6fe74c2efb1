"""What travels between the SDK and ``vlmtune serve``: one definition, read by both sides.

``wire`` (JSON shapes as pydantic models, with the encoders the SDK sends through),
``bodies`` (the request bodies of the Tinker routes), ``proto`` (the protobuf messages
the ``tinker`` client exchanges), ``paths`` (``tinker://`` checkpoint paths) and ``files``
(upload ids, ``file-<id>``). It
imports only ``vlmtune.types``: the SDK sits above the server and must not import it.
"""
