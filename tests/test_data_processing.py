"""Image transforms, caption/question cleaning and tokenisation (spec §4, §6, §7, §10).

References: `transformers`' BlipImageProcessorPil (the eval transform), PIL by hand (the train
crop), torchvision's RandomResizedCrop constraints, and LAVIS's text rules written out by hand.
"""
import dataclasses
import pickle

import easy_vqa
import numpy as np
import pytest
import transformers
from PIL import Image, ImageOps

from blip2_jax.data.images import load_image
from blip2_jax.data.loader import RecordProcessor, positive_key
from blip2_jax.data.text import TextError, pre_caption, pre_question, split_prefix
from blip2_jax.data.tokenizers import (Memoized, opt_eos_token_id, opt_prompt, opt_text, qformer_text,
                                       qformer_tokenizer, t5_text)
from blip2_jax.data.transforms import (AUGMENT_OPS, CLIP_MEAN, CLIP_STD, _warp, blip2_image_train, blip_image_eval,
                                       blip_image_train, rand_augment, resized_crop, sample_crop, to_rgb)
from blip2_jax.objectives import stage2
from tests.reference.tokenizers import word_tokenizer

MEAN, STD = np.asarray(CLIP_MEAN), np.asarray(CLIP_STD)


def _pixels(normalised: np.ndarray) -> np.ndarray:
    """Back to [0, 255] from CLIP-normalised HWC."""
    return (normalised * STD + MEAN) * 255


def _photos() -> list[Image.Image]:
    paths = sorted(easy_vqa.get_train_image_paths().items())[:3]
    return [Image.open(p) for _, p in paths]


def _synthetic(mode: str) -> Image.Image:
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (45, 70), dtype=np.uint8)
    if mode == "RGBA":  # opaque, so HF's composite onto white and LAVIS's dropped alpha agree
        return Image.fromarray(np.dstack([rng.integers(0, 256, (45, 70, 3), dtype=np.uint8), np.full_like(grey, 255)]))
    if mode == "P":
        return Image.fromarray(rng.integers(0, 256, (45, 70, 3), dtype=np.uint8)).quantize(64)
    return Image.fromarray(grey).convert(mode)  # L, CMYK


def test_eval_transform_matches_hf_blip_image_processor():
    hf = transformers.BlipImageProcessorPil(size={"height": 224, "width": 224})
    transform = blip_image_eval(224)
    for image in _photos() + [_synthetic(m) for m in ("RGBA", "CMYK", "L", "P")]:
        ours = transform(image)
        theirs = hf(image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        assert ours.shape == (224, 224, 3) and ours.dtype == np.float32
        assert np.abs(_pixels(ours) - _pixels(theirs)).max() <= 1.0, image.mode


def test_sixteen_bit_is_scaled_not_clipped():
    values = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    expected = np.round(values / 257).astype(np.uint8)  # 65535 -> 255, 257 * k -> k
    np.testing.assert_array_equal(np.asarray(to_rgb(image)), np.repeat(expected[..., None], 3, -1))
    np.testing.assert_array_equal(np.asarray(load_image(image.convert("I"))), np.asarray(to_rgb(image)))
    hf = transformers.BlipImageProcessorPil(size={"height": 32, "width": 32})
    theirs = hf(Image.fromarray(expected), return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    assert np.abs(_pixels(blip_image_eval(32)(image)) - _pixels(theirs)).max() <= 1.0


def test_train_crop_is_pil_crop_resize_and_mirror():
    image = _photos()[0].convert("RGB").resize((80, 60))
    for crop, flip in [((3, 7, 40, 50), False), ((0, 0, 60, 80), True), ((10, 29, 45, 33), True)]:
        i, j, h, w = crop
        expected = image.crop((j, i, j + w, i + h)).resize((32, 32), Image.BICUBIC)
        expected = ImageOps.mirror(expected) if flip else expected
        got = np.asarray(resized_crop(image, crop, 32, flip), np.float64)
        assert np.abs(got - np.asarray(expected, np.float64)).max() <= 1.0


def _rounding_consistent(h: int, w: int, area: float) -> bool:
    """Some unrounded (w0, h0) within 0.5 of (w, h) has w0*h0/area in [0.5, 1] and w0/h0 in [3/4, 4/3]."""
    return ((w - 0.5) * (h - 0.5) <= area and (w + 0.5) * (h + 0.5) >= 0.5 * area
            and (w - 0.5) / (h + 0.5) <= 4 / 3 and (w + 0.5) / (h - 0.5) >= 3 / 4)


@pytest.mark.parametrize("width,height,too_narrow", [(80, 60, False), (5, 5, False), (37, 200, True),
                                                     (300, 20, True)])
def test_sampled_crops_satisfy_torchvision_constraints(width, height, too_narrow):
    crops, fallback = set(), 0
    for seed in range(300):
        crop = sample_crop(width, height, np.random.default_rng(seed))
        assert crop == sample_crop(width, height, np.random.default_rng(seed))  # reproducible from the seed
        i, j, h, w = crop
        assert 0 <= i <= height - h and 0 <= j <= width - w and h > 0 and w > 0
        crops.add(crop)
        if not _rounding_consistent(h, w, width * height):  # then it must be torchvision's fallback
            fallback += 1
            ratio = width / height  # the whole image, cut to the nearest allowed ratio
            expected_w = round(height * 4 / 3) if ratio > 4 / 3 else width
            expected_h = round(width / (3 / 4)) if ratio < 3 / 4 else height
            assert (h, w) == (expected_h, expected_w) and (i, j) == ((height - h) // 2, (width - w) // 2), crop
    # Too narrow: no box of ratio within [3/4, 4/3] and half the area fits, so every draw falls back.
    assert (fallback, len(crops)) == (300, 1) if too_narrow else (fallback < 300 and len(crops) > 1)


def test_train_transform_is_its_crop_then_flip_then_normalise():
    image = _photos()[1]
    for seed in range(4):
        rng = np.random.default_rng(seed)
        crop = sample_crop(image.width, image.height, rng)
        flip = rng.random() < 0.5
        expected = np.asarray(resized_crop(image.convert("RGB"), crop, 48, flip), np.float64)
        got = blip2_image_train(48)(image, np.random.default_rng(seed))
        assert got.shape == (48, 48, 3) and got.dtype == np.float32
        assert np.abs(_pixels(got) - expected).max() < 1e-3
    with pytest.raises(ValueError, match="needs a numpy Generator"):
        blip2_image_train(48)(image)
    assert pickle.loads(pickle.dumps(blip_image_train(48))) == blip_image_train(48)  # Grain workers pickle it


def test_rand_augment_deterministic_in_range_and_seed_dependent():
    image = _photos()[2].convert("RGB")
    outputs = []
    for seed in range(12):
        a = np.asarray(rand_augment(image, np.random.default_rng(seed)))
        np.testing.assert_array_equal(a, np.asarray(rand_augment(image, np.random.default_rng(seed))))
        assert a.shape == (64, 64, 3) and a.dtype == np.uint8
        outputs.append(a)
    assert len({o.tobytes() for o in outputs}) >= 4  # different ops / signs for different seeds
    full = blip_image_train(40)(image, np.random.default_rng(3))
    assert full.shape == (40, 40, 3) and np.all(np.isfinite(full))
    assert np.all(_pixels(full) >= -1e-3) and np.all(_pixels(full) <= 255 + 1e-3)
    np.testing.assert_array_equal(full, blip_image_train(40)(image, np.random.default_rng(3)))
    for name, op in AUGMENT_OPS.items():
        out = op(image, 5, np.random.default_rng(0))
        assert out.size == image.size and out.mode == "RGB", name
        # LAVIS's enhance factor is 1.0 at M=5: these two ops leave the image as it is
        assert (name in ("Identity", "Brightness", "Sharpness")) == (out.tobytes() == image.tobytes()), name


def test_geometric_augment_ops_follow_cv2_geometry():
    """A one-pixel dot moves where cv2.warpAffine's forward matrix sends it (LAVIS uses cv2)."""
    canvas = np.zeros((21, 31, 3), np.uint8)
    canvas[5, 8] = 255
    image = Image.fromarray(canvas)
    for forward, (x, y) in [(np.array([[1.0, 0, 3], [0, 1, -2]]), (11, 3)),  # translate by (+3, -2)
                            (np.array([[1.0, 1.0, 0], [0, 1, 0]]), (13, 5)),  # shear x: x + y
                            (np.array([[0.0, 1, 0], [-1, 0, 20]]), (5, 12))]:  # rotate 90°: (y, 20 - x)
        out = np.asarray(_warp(image, forward))
        assert out[y, x, 0] == 255, np.argwhere(out[..., 0] == 255)
        assert out[..., 0].astype(int).sum() - 128 * (out[..., 0] == 128).sum() == 255


CAPTIONS = [  # (raw, expected) by LAVIS blip_caption's rules
    ("A man riding a horse.", "a man riding a horse"),
    ("Hello,   world!", "hello, world"),  # comma kept, runs collapse, '!' -> space then stripped
    ('He said "hi" (twice)', "he said hi twice"),
    ("  Leading and trailing  ", "leading and trailing"),
    ("line one\nline two\n", "line one\nline two"),  # a single newline is not a run: it stays
    ("two\n\nnewlines", "two newlines"),
    ("it's a dog-friendly café? yes/no", "it's a dog-friendly café? yes/no"),  # ' - ? / kept
    ("ÉCOLE ÜBER Straße", "école über straße"),
    ("a*b#c~d;e:f", "a b c d e f"),
    ("Tab\tseparated", "tab\tseparated"),
    ("...wait...", "wait"),
    ("trailing space and newline \n", "trailing space and newline"),  # " \n" is a run of two
    (" ".join(f"W{i}" for i in range(60)), " ".join(f"w{i}" for i in range(50))),
]
QUESTIONS = [  # (raw, expected) by LAVIS blip_question's rules
    ("What is the man holding?", "what is the man holding?"),
    ("Is it (really) a cat.", "is it really a cat"),  # deleted, not replaced by a space
    ("What's on the table;   ", "what's on the table"),
    ("  Leading spaces kept?", "  leading spaces kept?"),
    ("How many... dogs!", "how many dogs"),
    ("a:b", "ab"),
    ('Don\'t "quote" me', "don't quote me"),
    ("what\n", "what\n"),  # only trailing spaces are stripped
    ("Two  spaces stay", "two  spaces stay"),
    (" ".join(f"Q{i}" for i in range(60)), " ".join(f"q{i}" for i in range(50))),
    # split on single spaces: the double space is an empty word, so only 49 real words survive
    ("a  " + " ".join("b" * 49), "a  " + " ".join("b" * 48)),
]


@pytest.mark.parametrize("raw,expected", CAPTIONS)
def test_pre_caption(raw, expected):
    assert pre_caption(raw) == expected


@pytest.mark.parametrize("raw,expected", QUESTIONS)
def test_pre_question(raw, expected):
    assert pre_question(raw) == expected


def test_caption_prompt_and_bad_text():
    assert pre_caption("A dog.", prompt="a photo of ") == "a photo of a dog"
    assert pre_caption("one two three", max_words=2, prompt="a photo of ") == "a photo of one two"
    for bad, message in [(None, "must be a string, got NoneType"), (["a"], "got list"), ("", "empty"),
                         ("...", "empty"), ("  \n ", "empty")]:
        with pytest.raises(TextError, match=message):
            pre_caption(bad)
    with pytest.raises(TextError, match="question must be a string"):
        pre_question(3)
    with pytest.raises(TextError, match="empty"):
        pre_question("!")


def test_split_prefix_is_between_word_one_and_the_midpoint():
    words = [f"w{i}" for i in range(9)]
    seen = set()
    for seed in range(200):
        prefix, suffix = split_prefix(" ".join(words), np.random.default_rng(seed))
        k = len(prefix.split(" "))
        assert 1 <= k <= 4 and prefix.split(" ") + suffix.split(" ") == words
        seen.add(k)
    assert seen == {1, 2, 3, 4}
    assert split_prefix("a b", np.random.default_rng(0)) == ("a", "b")
    assert split_prefix("alone", np.random.default_rng(0)) == ("", "alone")


def _word_tokenizer(template: str, **specials: str) -> transformers.PreTrainedTokenizerFast:
    """Word-level; "\\n" is its own token. `template` is the post-processor (OPT: BOS first, T5: </s> last)."""
    special = ["<s>", "<pad>", "</s>", "<unk>"]
    words = ["\n", "a", "photo", "of", "dog", "cat", "question", "answer:"] + [f"w{i}" for i in range(40)]
    return word_tokenizer(special + words, template, {"<s>": 0, "</s>": 2}, pad_token="<pad>", **specials)


OPT_TOK = dict(template="<s> $A", bos_token="<s>", eos_token="</s>")  # ids: <s> 0, <pad> 1, </s> 2, "\n" 4


def test_opt_text_bos_newline_right_padding_and_prompt_length():
    tok = _word_tokenizer(**OPT_TOK)
    assert opt_eos_token_id(tok) == 4
    got = opt_text(tok, "a photo of a dog", prompt="a photo of", max_length=10)
    np.testing.assert_array_equal(got["text_ids"], [0, 5, 6, 7, 5, 8, 4, 1, 1, 1])
    np.testing.assert_array_equal(got["text_mask"], [1, 1, 1, 1, 1, 1, 1, 0, 0, 0])
    assert got["prompt_length"] == 4 and got["text_ids"].dtype == np.int32  # BOS + 3 prompt tokens
    cut = opt_text(tok, " ".join(f"w{i}" for i in range(20)), max_length=8)
    np.testing.assert_array_equal(cut["text_ids"], [0, 12, 13, 14, 15, 16, 17, 18])  # BOS counted, "\n" lost
    assert cut["text_mask"].all() and cut["prompt_length"] == 0
    with pytest.raises(ValueError, match="does not start with the prompt"):
        opt_text(tok, "a dog", prompt="a photo of")
    with pytest.raises(ValueError, match="must start with BOS"):
        opt_text(_word_tokenizer(template="$A", bos_token="<s>"), "a dog")


def test_opt_prompt_is_left_padded():
    tok = _word_tokenizer(**OPT_TOK)
    got = opt_prompt(tok, "question a cat answer:", max_length=8)
    np.testing.assert_array_equal(got["prompt_ids"], [1, 1, 1, 0, 10, 5, 9, 11])
    np.testing.assert_array_equal(got["prompt_mask"], [0, 0, 0, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(opt_prompt(tok, "", max_length=3)["prompt_ids"], [1, 1, 0])  # just BOS


def test_t5_text_ends_with_eos_and_pads_right():
    tok = _word_tokenizer(template="$A </s>", eos_token="</s>")
    got = t5_text(tok, "a photo of", "a dog", max_input_length=6, max_output_length=4)
    np.testing.assert_array_equal(got["input_ids"], [5, 6, 7, 2, 1, 1])
    np.testing.assert_array_equal(got["input_mask"], [1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(got["output_ids"], [5, 8, 2, 1])
    np.testing.assert_array_equal(got["output_mask"], [1, 1, 1, 0])
    long = t5_text(tok, " ".join(f"w{i}" for i in range(9)), "", max_input_length=4, max_output_length=2)
    np.testing.assert_array_equal(long["input_ids"], [12, 13, 14, 2])  # truncated, </s> kept
    np.testing.assert_array_equal(long["output_ids"], [2, 1])  # empty target: just </s>
    with pytest.raises(ValueError, match="must end with </s>"):
        t5_text(_word_tokenizer(**OPT_TOK), "a", "b")


def test_qformer_text_is_cls_sep_pad(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "cat"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = qformer_tokenizer(tmp_path)
    got = qformer_text(tok, pre_caption("A photo of a cat."), max_length=8)
    np.testing.assert_array_equal(got["text_ids"], [2, 5, 6, 7, 5, 8, 3, 0])
    np.testing.assert_array_equal(got["text_mask"], [1, 1, 1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(qformer_text(tok, "a photo of a cat", max_length=4)["text_ids"], [2, 5, 6, 3])


def test_memoized_tokenizer_gives_the_tokenizers_ids_and_pickles(tmp_path):
    """`Memoized` (the record processor's tokenizers): the wrapped call's ids for every text and
    argument set, a second call answered from memory, a full memory cleared, attributes passed
    through, and a pickled copy (a Grain worker's) that starts empty and answers the same."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "cat"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    calls = [("a photo of a cat", {}), ("a photo of a cat", dict(truncation=True, max_length=4)),
             ("a photo of a cat", dict(max_length=4, truncation=True)), ("a cat", dict(add_special_tokens=False)),
             ("", {}), ("a photo of a dog", {})]
    for tok in (qformer_tokenizer(tmp_path), _word_tokenizer(**OPT_TOK)):
        memo = Memoized(tok, size=3)
        for text, kwargs in calls * 2:
            assert memo(text, **kwargs)["input_ids"] == tuple(tok(text, **kwargs)["input_ids"])
        assert len(memo._ids) <= 3  # pylint: disable=protected-access
        first = memo("a cat")["input_ids"]
        assert memo("a cat")["input_ids"] is first
        assert (memo.pad_token_id, memo.bos_token_id) == (tok.pad_token_id, tok.bos_token_id)
        copy = pickle.loads(pickle.dumps(memo))
        assert copy("a photo of a cat", max_length=4, truncation=True) == memo("a photo of a cat", truncation=True,
                                                                               max_length=4)
        np.testing.assert_array_equal(qformer_text(copy, "a photo of a cat", 8)["text_ids"],
                                      qformer_text(tok, "a photo of a cat", 8)["text_ids"])


def test_prefix_lm_splits_the_caption_between_encoder_input_and_target(tmp_path):
    """FlanT5 prefix LM (spec §7.2): the prompt and the caption's first 1..n//2 words are the encoder
    input, the remaining words the target; nothing is lost or repeated, and the split varies by record."""
    _word_tokenizer(template="$A </s>", eos_token="</s>").save_pretrained(tmp_path)
    process = RecordProcessor("stage2_t5", stage2.batch_spec(32, 12, "t5"), blip2_image_train(32), str(tmp_path),
                              text_length=12, prompt="a photo of", prefix_lm=True)
    image = sorted(easy_vqa.get_train_image_paths().values())[0]
    caption = [12 + i for i in range(7)]  # the ids of "w0" .. "w6"
    seen = set()
    for seed in range(40):
        out = process({"id": "r", "image": image, "caption": "W0 w1 w2; w3  w4 w5 w6."}, np.random.default_rng(seed))
        inputs = out["input_ids"][out["input_mask"] == 1].tolist()
        targets = out["output_ids"][out["output_mask"] == 1].tolist()
        assert inputs[:3] == [5, 6, 7] and inputs[-1] == targets[-1] == 2  # prompt first, </s> last
        k = len(inputs) - 4
        assert 1 <= k <= 3 and inputs[3:-1] + targets[:-1] == caption
        seen.add(k)
    assert seen == {1, 2, 3}
    plain = dataclasses.replace(process, prefix_lm=False)
    out = plain({"id": "r", "image": image, "caption": "w0 w1"}, np.random.default_rng(0))
    np.testing.assert_array_equal(out["output_ids"][:3], [12, 13, 2])  # without the option: all target


def test_positive_keys_of_string_image_ids_are_stable_and_distinct():
    """LAVIS's COCO retrieval records carry image ids as strings ("coco_391895"): each becomes one
    int32 key (the same for every caption of that image), ints pass through unchanged, and as many
    ids as COCO's Karpathy splits hold (123,287) get distinct keys."""
    assert positive_key(7) == 7 and positive_key(np.int64(7)) == 7
    assert positive_key("coco_391895") == positive_key("coco_391895") != positive_key("coco_391896")
    keys = {int(positive_key(f"coco_{n}")) for n in range(123_287)}
    assert len(keys) == 123_287 and min(keys) >= 0
