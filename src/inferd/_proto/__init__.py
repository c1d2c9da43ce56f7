"""inferd's generated protobuf modules (``scripts/gen-protos``), built into their own pool.

The messages carry the full names of TensorFlow Serving's and KServe's (``tensorflow.TensorProto``,
``inference.ModelInferRequest``) so that stubs from those projects interoperate on the wire. In the
default descriptor pool those names would collide with TensorFlow's and tritonclient's own
modules; a private pool lets inferd's protos live in one process with either.
"""

from google.protobuf import any_pb2, descriptor_pool, wrappers_pb2

POOL = descriptor_pool.DescriptorPool()
"""Holds every inferd .proto file plus the well-known types they import."""

for _well_known in (any_pb2, wrappers_pb2):
    POOL.AddSerializedFile(_well_known.DESCRIPTOR.serialized_pb)
