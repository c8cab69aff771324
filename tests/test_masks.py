"""The three Q-Former self-attention masks (spec §5.4) as exact matrices on a padded case."""
import jax.numpy as jnp
import numpy as np
import pytest

from blip2_jax.models.attention import qformer_mask

# Q = 2 queries; text of L = 4 with the last token padding.
TEXT_MASK = jnp.array([[1, 1, 1, 0]])
EXPECTED = {
    "unimodal": [  # queries <-> queries, text <-> real text, nothing across
        [1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 1, 1, 1, 0],
    ],
    "bidirectional": [  # every row sees the queries and the real text
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 0],
    ],
    "multimodal_causal": [  # queries see queries; text sees queries and earlier real text
        [1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 0],
    ],
}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_mask_matrices(kind):
    got = qformer_mask(kind, 2, TEXT_MASK)
    assert got.shape == (1, 1, 6, 6) and got.dtype == jnp.bool_
    np.testing.assert_array_equal(np.asarray(got[0, 0]).astype(int), EXPECTED[kind])


def test_masks_are_per_example():
    masks = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0]])
    got = qformer_mask("multimodal_causal", 2, masks)
    np.testing.assert_array_equal(np.asarray(got[1, 0, 2:, 3:]).astype(int), np.zeros((4, 3), int))
    np.testing.assert_array_equal(np.asarray(got[0, 0]).astype(int), EXPECTED["multimodal_causal"])


def test_unknown_mask_kind():
    with pytest.raises(ValueError, match="bidirectional"):
        qformer_mask("causal", 2, TEXT_MASK)
