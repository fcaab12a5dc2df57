import numpy as np
import pytest

from serve.batching.merge import merge, signature, split


def test_merge_then_split_gives_each_request_its_rows():
    a = [np.arange(4, dtype=np.float32).reshape(2, 2), np.array([[1], [2]])]
    b = [np.full((1, 2), 9, dtype=np.float32), np.array([[3]])]
    merged = merge([a, b])
    assert merged[0].shape == (3, 2) and merged[1].tolist() == [[1], [2], [3]]
    parts = split(merged, [2, 1])
    np.testing.assert_array_equal(parts[0][0], a[0])
    np.testing.assert_array_equal(parts[1][0], b[0])
    np.testing.assert_array_equal(parts[1][1], b[1])


def test_signature_ignores_batch_rows_but_not_other_dims():
    assert signature([np.zeros((1, 5))]) == signature([np.zeros((7, 5))])
    assert signature([np.zeros((1, 5))]) != signature([np.zeros((1, 6))])


def test_split_rejects_outputs_with_the_wrong_row_count():
    with pytest.raises(ValueError, match="output #0 has 2 rows, expected 3"):
        split([np.zeros((2, 4))], [2, 1])
    with pytest.raises(ValueError, match="scalar"):
        split([np.float32(1.0) * np.ones(())], [1])
