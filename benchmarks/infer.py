"""Dataset-scale inference: `blip2-jax infer` against transformers on the same model and image files,
images per second end to end (reading the files included).

    python benchmarks/infer.py                  # 64 images: ~6 min on 2 idle cores
    python benchmarks/infer.py --images 16

What it measures, on a directory of `--images` PNG files (224 px), with the benchmarks' random
model (a ViT-B/16-sized vision tower, a BERT-base Q-Former, an OPT-125m-sized LM; fp32):
  caption: beam search, `--beams` beams, exactly `--new-tokens` new tokens (EOS forbidden before);
    ours `blip2_jax.infer.run.infer("caption", ...)` (shards written as Parquet),
    theirs `Blip2Processor` + `Blip2ForConditionalGeneration.generate` with the same settings, `--batch`
    images a call (transformers 5 has no "image-to-text" pipeline any more);
  embed: the Q-Former's query output of every image;
    ours `infer("embed", ..., feature="query_output")` (shards written as .npy),
    theirs `Blip2Model.get_qformer_features` over the processor's pixels, `--batch` images a call.
Each side runs the whole job once to warm up (our compiles happen there; later jobs in the same
process reuse them) and is then timed on a second job: loading the model from its directory,
reading every file, computing and (ours) writing the shards. The ratio is transformers' time over
ours. The captions are compared as texts (`same`).
"""
# pylint: disable=import-outside-toplevel
from __future__ import annotations

import argparse
import datetime
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from common import cpu_name, load_average, row, save_weights


def _tokenizer(directory: Path) -> None:
    """A word-level tokenizer over the OPT-125m-sized vocabulary (nothing can be downloaded here)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from common import IMAGE_TOKEN_INDEX, OPT_125M

    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    vocab = specials + [f"w{i}" for i in range(OPT_125M["vocab_size"] - len(specials))]
    vocab[IMAGE_TOKEN_INDEX] = "<image>"
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.add_special_tokens([*specials, "<image>"])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>", unk_token="<unk>")
    fast.image_token = "<image>"
    image_processor = transformers.BlipImageProcessor(size={"height": 224, "width": 224})
    transformers.Blip2Processor(image_processor, fast, num_query_tokens=32).save_pretrained(directory)


def _timed(run) -> float:
    tick = time.perf_counter()
    run()
    return time.perf_counter() - tick


def run_ours(model: Path, images: Path, out: Path, args) -> dict:
    from blip2_jax.generation.config import GenerationConfig
    from blip2_jax.infer.inputs import image_folder
    from blip2_jax.infer.run import infer

    records = image_folder(images)
    search = GenerationConfig(num_beams=args.beams, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    common = dict(batch_size=args.batch, shard_size=args.images, progress=False)
    times = {}
    for name, task, extra in (("caption", "caption", dict(generation=search)),
                              ("embed", "embed", dict(feature="query_output"))):
        infer(task, records, str(model), out / f"warm_{name}", **common, **extra)
        times[name] = _timed(lambda: infer(task, records, str(model), out / name, **common, **extra))
    from pyarrow import parquet as pq

    captions = pq.read_table(next((out / "caption").glob("*.parquet"))).to_pydict()["caption"]
    return dict(times=times, captions=captions)


def run_theirs(model: Path, images: Path, args) -> dict:
    import torch
    import transformers
    from PIL import Image

    torch.set_num_threads(os.cpu_count())
    files = sorted(str(p) for p in images.iterdir())

    def batches(processor):
        for start in range(0, len(files), args.batch):
            chunk = files[start:start + args.batch]  # no text: the processor's image tokens and BOS, as ours
            yield processor(images=[Image.open(f).convert("RGB") for f in chunk], text=[""] * len(chunk),
                            return_tensors="pt")

    @torch.no_grad()
    def caption():
        generator = transformers.Blip2ForConditionalGeneration.from_pretrained(model, dtype=torch.float32).eval()
        processor = transformers.Blip2Processor.from_pretrained(model)
        texts = []
        for inputs in batches(processor):
            ids = generator.generate(**inputs, num_beams=args.beams, max_new_tokens=args.new_tokens,
                                     min_new_tokens=args.new_tokens, do_sample=False)
            new = ids[:, inputs["input_ids"].shape[1]:]
            texts += [t.strip() for t in processor.tokenizer.batch_decode(new, skip_special_tokens=True)]
        return texts

    @torch.no_grad()
    def embed():
        qformer = transformers.Blip2Model.from_pretrained(model, dtype=torch.float32).eval()
        for inputs in batches(transformers.Blip2Processor.from_pretrained(model)):
            qformer.get_qformer_features(pixel_values=inputs["pixel_values"])

    caption(), embed()  # warm-up
    out = {}
    times = {"caption": _timed(lambda: out.setdefault("captions", caption())), "embed": _timed(embed)}
    return dict(times=times, captions=out["captions"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64, help="image files in the set")
    parser.add_argument("--batch", type=int, default=8, help="images per call (ours: per device)")
    parser.add_argument("--beams", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=20)
    args = parser.parse_args()
    import jax
    import torch
    import transformers
    from PIL import Image

    load_before = os.getloadavg()
    start = datetime.datetime.now().astimezone()
    with tempfile.TemporaryDirectory(prefix="blip2_infer_bench_") as tmp:
        tmp = Path(tmp)
        save_weights(str(tmp / "model"))
        _tokenizer(tmp / "model")
        (tmp / "images").mkdir()
        rng = np.random.default_rng(0)
        for i in range(args.images):
            Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(tmp / "images" / f"{i:05d}.png")
        theirs = run_theirs(tmp / "model", tmp / "images", args)
        ours = run_ours(tmp / "model", tmp / "images", tmp / "out", args)
    load_after = os.getloadavg()
    same = sum(a == b for a, b in zip(ours["captions"], theirs["captions"]))
    print(f"BLIP-2 dataset inference: blip2-jax infer (jax {jax.__version__}) vs transformers "
          f"{transformers.__version__} (torch {torch.__version__})")
    print(f"  {start:%Y-%m-%d %H:%M %Z}; {cpu_name()}, {os.cpu_count()} cores, {jax.device_count()} JAX device(s); "
          f"load average (1/5/15 min) {load_average(load_before)} before, {load_average(load_after)} after")
    print(f"  {args.images} PNG files, 224 px; ViT-B/16 + BERT-base Q-Former + OPT-125m-sized LM, fp32; batch "
          f"{args.batch}; captions: {args.beams} beams, {args.new_tokens} new tokens")
    print(row("", "ours (JAX)", "transformers (torch)", "torch / ours"))
    for name in ("caption", "embed"):
        t_ours, t_theirs = ours["times"][name], theirs["times"][name]
        print(row(f"{name}: images / s", f"{args.images / t_ours:.2f}", f"{args.images / t_theirs:.2f}",
                  f"{t_theirs / t_ours:.2f}x"))
    print(f"  same captions: {same} of {args.images}")


if __name__ == "__main__":
    main()
