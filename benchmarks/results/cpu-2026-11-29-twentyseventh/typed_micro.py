import time

import numpy as np

from serve.frontend.pb import grpc_service_pb2 as pb
from serve.frontend.typed import typed_array


def t(field, arr, dtype, n=20):
    m = pb.InferTensorContents()
    getattr(m, field).extend(arr.tolist())
    c = pb.InferTensorContents.FromString(m.SerializeToString())
    s = time.perf_counter()
    for _ in range(n):
        a = np.asarray(getattr(c, field), dtype=dtype)
    t1 = (time.perf_counter() - s) / n * 1e3
    s = time.perf_counter()
    for _ in range(n):
        b = typed_array(c, field, np.dtype(dtype), len(arr))
    t2 = (time.perf_counter() - s) / n * 1e3
    assert (a == b).all()
    print(
        f"{field:15s} {len(arr):8d} values: protobuf accessor {t1:7.2f} ms, "
        f"packed run {t2:6.3f} ms ({t1 / t2:.0f}x)"
    )


rng = np.random.default_rng(0)
t("uint_contents", rng.integers(0, 256, 224 * 224 * 3), np.uint8)
t("fp32_contents", rng.random(224 * 224 * 3).astype(np.float32), np.float32)
t("int_contents", rng.integers(-5, 30000, 100000), np.int32)
t("int64_contents", rng.integers(0, 30000, 512), np.int64)
t("bool_contents", rng.random(100000) > 0.5, np.bool_)
t("fp64_contents", rng.random(1000), np.float64)
t("fp32_contents", rng.random(4_000_000).astype(np.float32), np.float32, n=3)
