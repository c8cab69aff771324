"""Stage-1 input pipeline on CPU: images/s per core, time per stage, and memory over a long run.

    python benchmarks/data_pipeline.py                      # ~3.5 min on 2 idle cores
    python benchmarks/data_pipeline.py --records 128 --long-records 2000 --workers 0   # ~30 s
    python benchmarks/data_pipeline.py --compare webdataset   # tar shards in ArrayRecord's place
    python benchmarks/data_pipeline.py --compare parquet      # Parquet files (row groups of 64)

What it measures: the stage-1 processing of one record as a stage-1 run's loader does it
(`data.loader.RecordProcessor`): read, decode the image, `blip2_image_train(224)` (random resized
crop, flip, CLIP normalisation), `pre_caption`, Q-Former tokens (32), through `make_pipeline`
(batch `--batch`), from
  JSON:        a LAVIS-style captions file over JPEG files on disk (`JsonSource`);
  ArrayRecord: the same records converted with `write_array_records` (`ArrayRecordSource`), or with
    `--compare webdataset`, WebDataset tar shards of them (`key.jpg` + `key.txt`, written here with
    `tarfile`; `WebDatasetSource`), or with `--compare parquet`, Parquet files of them (image bytes
    and caption columns, row groups of PARQUET_GROUP rows, written with pyarrow; `ParquetSource`).
The data set is made here: `--records` easy-VQA images (the 64 px PNGs the `easy-vqa` package
bundles) upscaled to COCO's usual 640x480 and saved as JPEG quality 90, each with a short caption
(one of its easy-VQA questions and the answer). Plain shapes compress far better than photographs
(the mean file size is printed; COCO's is ~160 KB), so the decode time is on the low side.
Nothing can be downloaded, so the tokenizer is a BERT WordPiece built here: a vocabulary of the
captions' words (BERT's own normaliser and pre-tokeniser from `tokenizers`) plus BERT's specials,
loaded by `qformer_tokenizer` (the trainer's `BertTokenizerFast` with `[DEC]`, its settings).

How to read it:
  per record, ms: CPU milliseconds (this thread's CPU time, far less sensitive than wall time to
    other work on the machine; best of 3 passes) of the processing called directly over every
    record, no pipeline; cumulative: reading the record, + decoding, + the augmentation, + caption
    and tokens (= all of it). `direct calls` is 1 / all: one core with no pipeline overhead.
  pipeline, N workers: `make_pipeline(worker_count=N)` over one epoch after a 2-epoch warm-up
    (workers take seconds to start: imports, the tokenizer). `img/s` is wall time; `img/CPU-second`
    counts the CPU time of this process and its workers (/proc), the images/s per core with every
    pipeline cost in it; `cores busy` is CPU time over wall time. 0 workers is not one core: every
    process runs the processing in `make_pipeline`'s 16 read threads, and PIL releases the GIL.
    A host needs about (the trainer's images/s per host) / (img/CPU-second) cores for its input.
  memory: the ArrayRecord (or WebDataset, or Parquet) pipeline with `--workers` workers for
    `--long-records` records (many epochs); the RSS of this process and the sum over its child
    processes (Grain's workers and multiprocessing's resource tracker; pages they share count in
    each), from /proc, every 2 batches after the first quarter of the run (warm-up). Slope:
    least-squares fit, MiB per 1000 batches, ± its standard error, which understates the spread
    (successive samples are correlated: two default runs of the same code gave +15 and +2). `flat`
    means |slope| < 25 MiB per 1000 batches (~800 bytes a record at batch 32): what the default
    length can tell from noise. It
    catches a pipeline that keeps an image or a batch alive, not a slow creep over a months-long run:
    for that, raise `--long-records` (the resolution improves as length^1.5). Like the `blip2-jax`
    command, this process caps glibc's malloc arenas (`limit_malloc_arenas`); Grain's spawned
    workers start with glibc's defaults.
  skipped: the pipelines' bad-record counters (`BatchIterator.stats`); 0 here, all records are good.
Wall times share the machine with whatever else runs: the load average is printed before and after
(`after` counts this benchmark's own threads too: Linux counts each runnable thread). Even CPU times
move by up to ~15% from run to run on a shared VM: smaller differences between rows mean nothing.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import io
import os
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import easy_vqa
import numpy as np
from absl import flags
from PIL import Image
from tokenizers import normalizers, pre_tokenizers

from blip2_jax.data.loader import RecordProcessor
from blip2_jax.data.parquet import ParquetSource
from blip2_jax.data.pipeline import limit_malloc_arenas, make_pipeline
from blip2_jax.data.sources import ArrayRecordSource, JsonSource, Source, read_image, write_array_records
from blip2_jax.data.text import pre_caption
from blip2_jax.data.transforms import blip2_image_train
from blip2_jax.data.webdataset import WebDatasetSource
from blip2_jax.objectives import stage1
from common import cpu_name, load_average, row

IMAGE_SIZE, TEXT_LENGTH = 224, 32
STORED_SIZE, JPEG_QUALITY = (640, 480), 90
NUM_SHARDS = 4
PARQUET_GROUP = 64
STAGE_PASSES = 3
WARMUP_EPOCHS = 2  # of the rate measurements; the memory run's warm-up is its first quarter
SAMPLE_EVERY, MIN_LONG_BATCHES = 2, 40
FLAT_MIB_PER_1000_BATCHES = 25.0
PAGE_BYTES, CLOCK_TICKS = os.sysconf("SC_PAGE_SIZE"), os.sysconf("SC_CLK_TCK")
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_dataset(root: Path, count: int) -> Path:
    """`count` easy-VQA images as 640x480 JPEGs under `root`, and a LAVIS captions file over them."""
    questions, answers, image_ids = easy_vqa.get_train_questions()
    paths = easy_vqa.get_train_image_paths()
    caption_of = {}
    for question, answer, image_id in zip(questions, answers, image_ids):
        caption_of.setdefault(image_id, f"{question} {answer}")
    (root / "images").mkdir()
    annotations = []
    for i in range(count):
        image_id = i % len(paths)
        name = f"images/{i}.jpg"
        Image.open(paths[image_id]).convert("RGB").resize(STORED_SIZE, Image.BICUBIC).save(
            root / name, quality=JPEG_QUALITY)
        annotations.append({"image": name, "caption": caption_of[image_id], "image_id": image_id})
    file = root / "captions.json"
    file.write_text(json.dumps(annotations))
    return file


def write_tar_shards(source: JsonSource, directory: Path, shards: int) -> str:
    """`source`'s records as WebDataset tar shards (`<i>.jpg`, `<i>.txt`); returns their brace pattern."""
    directory.mkdir()
    n = len(source)
    for shard in range(shards):
        with tarfile.open(directory / f"{shard:05d}.tar", "w") as tar:
            for i in range(shard * n // shards, (shard + 1) * n // shards):
                record = source[i]
                for name, data in ((f"{i:06d}.jpg", Path(record["image"]).read_bytes()),
                                   (f"{i:06d}.txt", record["caption"].encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(directory / f"{{00000..{shards - 1:05d}}}.tar")


def write_parquet(source: JsonSource, directory: Path, files: int) -> str:
    """`source`'s records as Parquet files (image bytes, caption); returns their brace pattern."""
    import pyarrow as pa
    from pyarrow import parquet as pq

    directory.mkdir()
    n = len(source)
    for f in range(files):
        rows = [source[i] for i in range(f * n // files, (f + 1) * n // files)]
        table = pa.table({"image": [Path(r["image"]).read_bytes() for r in rows],
                          "caption": [r["caption"] for r in rows]})
        pq.write_table(table, directory / f"{f:05d}.parquet", row_group_size=PARQUET_GROUP)
    return str(directory / f"{{00000..{files - 1:05d}}}.parquet")


def write_vocabulary(captions: list[str], directory: Path) -> Path:
    """A BERT vocab.txt in `directory`: BERT's specials and the captions' words."""
    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = {w for c in captions for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(c))}
    directory.mkdir()
    (directory / "vocab.txt").write_text("\n".join(BERT_SPECIALS + sorted(words)) + "\n")
    return directory


def stage_times(source: Source, process: RecordProcessor) -> dict[str, float]:
    """CPU seconds per record of each cumulative stage, called directly over every record of `source`
    in this thread, the best of `STAGE_PASSES` passes."""
    stages: dict[str, Callable[[int], Any]] = {
        "read": lambda i: source[i],
        "decode": lambda i: read_image(source[i]["image"]),
        "augment": lambda i: process.image_transform(read_image(source[i]["image"]), np.random.default_rng(i)),
        "all": lambda i: process(source[i], np.random.default_rng(i)),
    }
    times = collections.defaultdict(lambda: float("inf"))
    for _ in range(STAGE_PASSES):
        for name, stage in stages.items():
            tick = time.thread_time()
            for i in range(len(source)):
                stage(i)
            times[name] = min(times[name], (time.thread_time() - tick) / len(source))
    return times


def process_tree(root: int) -> dict[int, tuple[float, float]]:
    """{pid: (RSS MiB, CPU seconds)} of `root` and every process below it, from /proc/*/stat (Linux)."""
    stats = {}
    for path in Path("/proc").glob("[0-9]*/stat"):
        try:  # fields after the command name, which may hold spaces; field n of proc(5) is [n - 3]
            stats[int(path.parent.name)] = path.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended while we listed
            continue
    children = collections.defaultdict(list)
    for pid, fields in stats.items():
        children[int(fields[1])].append(pid)
    tree, todo = {}, [root]
    while todo:
        pid = todo.pop()
        todo.extend(children[pid])
        fields = stats[pid]
        tree[pid] = (int(fields[21]) * PAGE_BYTES / 2 ** 20, (int(fields[11]) + int(fields[12])) / CLOCK_TICKS)
    return tree


def cpu_seconds() -> float:
    return sum(cpu for _, cpu in process_tree(os.getpid()).values())


def pipeline_rate(source: Source, process: RecordProcessor, batch: int, workers: int) -> dict[str, float]:
    """Images/s and images per CPU-second (this process and its workers) over one epoch after a
    `WARMUP_EPOCHS` warm-up (workers take seconds to start: imports, the tokenizer), and the records
    skipped."""
    iterator = make_pipeline(source, process=process, global_batch_size=batch, seed=0, worker_count=workers)
    batches = len(source) // batch
    for _ in range(WARMUP_EPOCHS * batches):
        next(iterator)
    tick, cpu = time.perf_counter(), cpu_seconds()
    for _ in range(batches):
        next(iterator)
    wall, cpu = time.perf_counter() - tick, cpu_seconds() - cpu
    iterator.close()
    return dict(rate=batches * batch / wall, per_cpu_second=batches * batch / cpu, cores=cpu / wall,
                skipped=iterator.stats["skipped"])


def memory_run(source: Source, process: RecordProcessor, args: argparse.Namespace) -> dict[str, Any]:
    """RSS samples (batch, this process MiB, children MiB) over the last 3/4 of `--long-records` records."""
    iterator = make_pipeline(source, process=process, global_batch_size=args.batch, seed=0,
                             worker_count=args.workers)
    batches = args.long_records // args.batch
    warmup = batches // 4
    me, samples = os.getpid(), []
    tick = time.perf_counter()
    for b in range(1, batches + 1):
        next(iterator)
        if b >= warmup and (b - warmup) % SAMPLE_EVERY == 0:
            rss = {pid: mib for pid, (mib, _) in process_tree(me).items()}
            samples.append((b, rss.pop(me), sum(rss.values())))
    rate = batches * args.batch / (time.perf_counter() - tick)
    iterator.close()
    return dict(samples=np.array(samples), batches=batches, warmup=warmup, rate=rate,
                skipped=iterator.stats["skipped"])


def main() -> None:
    limit_malloc_arenas()  # as the `blip2-jax` command does before it builds a pipeline
    cores = os.cpu_count() or 1
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=512, help="images (and captions) in the data set")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--long-records", type=int, default=20_000, help="records read in the memory run")
    parser.add_argument("--compare", choices=["arrayrecord", "webdataset", "parquet"], default="arrayrecord",
                        help="the source measured beside JSON files, and the one the memory run reads")
    parser.add_argument("--workers", type=int, default=cores if cores > 1 else 0,
                        help="Grain worker processes of the multi-process rate (0: none) and of the memory run")
    args = parser.parse_args()
    if args.records < args.batch:
        parser.error(f"--records {args.records} must hold at least one batch of {args.batch}")
    if args.long_records < MIN_LONG_BATCHES * args.batch:
        parser.error(f"--long-records must give at least {MIN_LONG_BATCHES} batches of {args.batch}")
    flags.FLAGS.mark_as_parsed()  # Grain's workers read absl flags, which only a CLI run would have parsed

    load_before = os.getloadavg()
    start = datetime.datetime.now().astimezone()
    with tempfile.TemporaryDirectory(prefix="blip2_data_bench_") as tmp:
        root = Path(tmp)
        json_source = JsonSource(make_dataset(root, args.records), root)
        captions = [json_source[i]["caption"] for i in range(len(json_source))]
        vocabulary = write_vocabulary(captions, root / "tokenizer")
        process = RecordProcessor("stage1", stage1.batch_spec(IMAGE_SIZE, TEXT_LENGTH), blip2_image_train(IMAGE_SIZE),
                                  str(vocabulary), TEXT_LENGTH)
        process(json_source[0], np.random.default_rng(0))  # loads the tokenizer outside the timings
        if args.compare == "arrayrecord":
            other = ArrayRecordSource(write_array_records(json_source, root / "shards" / "captions", NUM_SHARDS)[0])
        elif args.compare == "webdataset":
            other = WebDatasetSource(write_tar_shards(json_source, root / "tars", NUM_SHARDS))
        else:
            other = ParquetSource(write_parquet(json_source, root / "parquet", NUM_SHARDS))
        sources = {"json": json_source, "other": other}
        jpeg_kb = np.mean([p.stat().st_size for p in (root / "images").iterdir()]) / 1000
        stages = {k: stage_times(s, process) for k, s in sources.items()}
        single = {k: pipeline_rate(s, process, args.batch, 0) for k, s in sources.items()}
        multi = {k: pipeline_rate(s, process, args.batch, args.workers) for k, s in sources.items()} \
            if args.workers else {}
        memory = memory_run(other, process, args)
    load_after = os.getloadavg()

    words = np.mean([len(pre_caption(c).split()) for c in captions])
    label = {"arrayrecord": "ArrayRecord", "webdataset": "WebDataset", "parquet": "Parquet"}[args.compare]
    print(f"Stage-1 input pipeline: decode + blip2_image_train({IMAGE_SIZE}) + pre_caption + Q-Former tokens "
          f"({TEXT_LENGTH}), make_pipeline batch {args.batch}")
    print(f"  {start:%Y-%m-%d %H:%M %Z}; {cpu_name()}, {cores} cores; load average (1/5/15 min) "
          f"{load_average(load_before)} before, {load_average(load_after)} after")
    print(f"  {args.records} records: easy-VQA images as {STORED_SIZE[0]}x{STORED_SIZE[1]} JPEG q{JPEG_QUALITY} "
          f"(mean {jpeg_kb:.0f} KB), captions of {words:.1f} words; {label} in {NUM_SHARDS} shards")
    print(row("", "JSON + JPEG files", label, "speed-up"))
    names = {"read": "per record, ms: read", "decode": "  + decode", "augment": "  + blip2_image_train",
             "all": "  + caption, tokens (all)"}
    for stage, name in names.items():
        json_s, other_s = stages["json"][stage], stages["other"][stage]
        print(row(name, f"{json_s * 1e3:.3f}", f"{other_s * 1e3:.3f}", f"{json_s / other_s:.2f}x"))
    rates = {"direct calls: img/s (1 thread)": {k: 1 / s["all"] for k, s in stages.items()}}
    for workers, result in ((0, single), (args.workers, multi)):
        if result:
            rates[f"pipeline, {workers} workers: img/s"] = {k: r["rate"] for k, r in result.items()}
            rates[f"  {workers} workers: img/CPU-second"] = {k: r["per_cpu_second"] for k, r in result.items()}
            rates[f"  {workers} workers: cores busy"] = {k: r["cores"] for k, r in result.items()}
    for name, rate in rates.items():
        ratio = "" if name.endswith("cores busy") else f"{rate['other'] / rate['json']:.2f}x"
        print(row(name, f"{rate['json']:.1f}", f"{rate['other']:.1f}", ratio))
    skipped = {k: single[k]["skipped"] + (multi[k]["skipped"] if multi else 0) for k in sources}
    print(row("skipped records", str(skipped["json"]), str(skipped["other"])))

    samples = memory["samples"]
    columns = {"this process": samples[:, 1]}
    if args.workers:
        columns.update({"child processes (sum)": samples[:, 2], "total": samples[:, 1:].sum(1)})
    fits = {k: np.polyfit(samples[:, 0], v, 1, cov=True) for k, v in columns.items()}
    slopes = {k: (coef[0] * 1000, np.sqrt(cov[0, 0]) * 1000) for k, (coef, cov) in fits.items()}
    print(f"  memory: {label} pipeline, {args.workers} workers, {memory['batches']} batches "
          f"({memory['batches'] * args.batch / args.records:.0f} epochs, {memory['rate']:.0f} img/s); RSS every "
          f"{SAMPLE_EVERY} batches after a {memory['warmup']}-batch warm-up, {len(samples)} samples")
    print(row("RSS (MiB)", f"batch {int(samples[0, 0])}", f"batch {int(samples[-1, 0])}", "MiB/1k batches"))
    for name, values in columns.items():
        slope, error = slopes[name]
        print(row(f"  {name}", f"{values[0]:.1f}", f"{values[-1]:.1f}", f"{slope:+.1f} ± {error:.1f}"))
    slope, error = slopes["total" if args.workers else "this process"]
    flat = abs(slope) < FLAT_MIB_PER_1000_BATCHES
    print(f"  {'total ' if args.workers else ''}RSS {'flat' if flat else 'NOT flat'}: |slope| {abs(slope):.1f} "
          f"{'<' if flat else '>='} {FLAT_MIB_PER_1000_BATCHES:.0f} MiB per 1000 batches (± is the fit's standard "
          f"error); skipped "
          f"records {memory['skipped']} of {memory['batches'] * args.batch}")


if __name__ == "__main__":
    main()
