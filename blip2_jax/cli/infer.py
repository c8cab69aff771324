"""`blip2-jax infer caption|answer|embed|capfilt`: a model over a whole set, written shard by shard;
`blip2-jax infer search`: text queries against an embedded set."""
from __future__ import annotations

import dataclasses
import json

from absl import app, flags, logging

from blip2_jax.cli.command import (Command, define_checkpoint, define_distributed, define_out,
                                   define_tokenizer)
from blip2_jax.cli.inference import define_dtype, define_search, search_config


def _flags(task: str):
    def define(values: flags.FlagValues, argv: list[str]) -> None:
        del argv
        define_checkpoint(values, {"embed": "The model (a retrieval model for ITC features)",
                                   "answer": "The model (stage 2)"}.get(task, "The model (stage 2, or stage 1: its "
                                                                                "Q-Former's decoder captions)"))
        define_out(values, "a directory of shards (resumed where a killed run stopped)")
        flags.DEFINE_string("images", None, "A directory of images (every image file under it).", flag_values=values)
        flags.DEFINE_multi_string("annotations", [], "LAVIS-style JSON records (image" +
                                  (", question" if task == "answer" else "") + "); repeat for several.",
                                  flag_values=values)
        flags.DEFINE_string("image_root", "", "The directory the records' image paths are under.", flag_values=values)
        if task != "capfilt":  # capfilt's annotation file points at image files
            flags.DEFINE_string("arrayrecord", None, "An ArrayRecord set (the --out PREFIX of `blip2-jax data build`).",
                                flag_values=values)
            flags.DEFINE_string("tfds", None, "A TFDS data set as NAME:SPLIT (prepared as array_record).",
                                flag_values=values)
            flags.DEFINE_string("tfds_data_dir", "", "TFDS's data directory (default: its own).", flag_values=values)
            flags.DEFINE_list("tfds_fields", [], "KEY=FEATURE pairs beyond image=image, e.g. question=question.",
                              flag_values=values)
        flags.DEFINE_integer("shard_size", 256, "Records per output shard.", flag_values=values)
        flags.DEFINE_integer("batch_size", 8, "Images per device per compiled call.", flag_values=values)
        flags.DEFINE_integer("num_devices", -1, "Devices to use (-1: all).", flag_values=values)
        define_dtype(values)
        define_distributed(values)
        if task == "embed":
            flags.DEFINE_enum("feature", "itc_image", ["image_embeds", "query_output", "language_inputs", "itc_image"],
                              "Which image feature (blip2_jax/features.py).", flag_values=values)
            return
        define_tokenizer(values, "default: the checkpoint's")
        flags.DEFINE_string("prompt", None, "Text each caption continues (default: none) or, for answers, a "
                            "template with {} (default: the paper's VQA prompt for the checkpoint's LLM).",
                            flag_values=values)
        define_search(values)
        if task == "capfilt":
            flags.DEFINE_string("ranker", None, "A retrieval model (stage 1) whose ITC ranks the captions.",
                                flag_values=values)
            flags.DEFINE_integer("num_captions", 10, "Captions sampled per image (the paper: 10).", flag_values=values)
            flags.DEFINE_integer("keep", 2, "Captions kept per image, of the sampled and its own (the paper: 2).",
                                 flag_values=values)
            flags.DEFINE_float("top_p", None, "Nucleus sampling's p (default 0.9, LAVIS's).", flag_values=values)
            flags.DEFINE_integer("seed", 0, "Sampling seed (each image draws with its own key from it).",
                                 flag_values=values)
    return define


def _records(values: flags.FlagValues, command: Command, task: str) -> list[dict]:
    from blip2_jax.infer import inputs  # pylint: disable=import-outside-toplevel

    given = [f for f in ("images", "annotations", "arrayrecord", "tfds") if f in values and values[f].value]
    if len(given) != 1:
        raise app.UsageError(f"{command.name} needs one input: {_INPUTS[task]}\n{command.usage()}")
    if task == "answer" and values.images:
        raise app.UsageError(f"{command.name} reads questions from records, not --images\n{command.usage()}")
    need_question = task == "answer"
    if values.images:
        return inputs.image_folder(values.images)
    if given == ["arrayrecord"]:
        return inputs.arrayrecord_records(values.arrayrecord, need_question=need_question)
    if given == ["tfds"]:
        return inputs.tfds_records(values.tfds, values.tfds_data_dir, values.tfds_fields, need_question=need_question)
    return inputs.annotation_records(values.annotations, values.image_root, need_question=need_question,
                                     per_image=task == "capfilt")


def _run(task: str):
    def run(values: flags.FlagValues) -> None:
        # pylint: disable=import-outside-toplevel  # keep --help fast
        from blip2_jax.generation.api import check_question_template
        from blip2_jax.errors import UserError
        from blip2_jax.generation.config import (CAPFILT, CAPTION, PROMPTS, STAGE1_CAPFILT, STAGE1_CAPTION, VQA_OPT,
                                                 VQA_T5)
        from blip2_jax.infer.capfilt import CapFiltConfig
        from blip2_jax.infer.run import infer
        from blip2_jax.weights.load import open_source

        from blip2_jax.parallel.distributed import initialize

        command = COMMANDS[task]
        command.require(values, "checkpoint", "out", *(("ranker",) if task == "capfilt" else ()))
        logging.set_verbosity(logging.WARNING)
        initialize(values.coordinator_address, values.num_processes, values.process_id)  # before JAX starts
        records = _records(values, command, task)
        options = {}
        if task != "embed":
            text = open_source(values.checkpoint, values.step).config.text
            if text is None and task == "answer":
                raise UserError(f"--checkpoint {values.checkpoint} has no language model: answers need a stage-2 "
                                "model (a stage-1 one captions)")
            t5 = text is not None and text.is_encoder_decoder
            presets = {"caption": CAPTION, "capfilt": CAPFILT} if text is not None else \
                {"caption": STAGE1_CAPTION, "capfilt": STAGE1_CAPFILT}
            preset = presets.get(task, VQA_T5 if t5 else VQA_OPT)
            prompt = values.prompt if values.prompt is not None else \
                ("" if task != "answer" else PROMPTS["vqa_t5" if t5 else "vqa_opt"])
            if task == "answer":
                check_question_template(prompt)
            generation = search_config(values, preset)
            if task == "capfilt":
                if values.top_p is not None:
                    generation = dataclasses.replace(generation, top_p=values.top_p)
                options["capfilt"] = CapFiltConfig(values.ranker, values.num_captions, values.keep, values.seed)
            options.update(prompt=prompt, generation=generation, tokenizer=values.tokenizer or "")
        else:
            options = dict(feature=values.feature)
        summary = infer(task, records, values.checkpoint, values.out, step=values.step, batch_size=values.batch_size,
                        shard_size=values.shard_size, num_devices=values.num_devices, dtype=values.dtype, **options)
        print(json.dumps(summary, indent=2))
    return run


def _search_flags(values: flags.FlagValues, argv: list[str]) -> None:
    del argv
    flags.DEFINE_string("index", None, "The directory of an `infer embed --feature itc_image` run.", flag_values=values)
    flags.DEFINE_multi_string("query", [], "A text to rank the images for; repeat for several.", flag_values=values)
    flags.DEFINE_integer("top_k", 10, "Images listed per query.", flag_values=values)
    flags.DEFINE_string("checkpoint", "", "The retrieval model (default: the one that built the index).",
                        flag_values=values)
    flags.DEFINE_string("tokenizer", "", "The Q-Former's BERT tokenizer (default: the checkpoint's).",
                        flag_values=values)


def _search(values: flags.FlagValues) -> None:
    from blip2_jax.infer.index import search_texts  # pylint: disable=import-outside-toplevel

    if not values.index or not values.query:
        raise app.UsageError(f"infer search needs --index DIR and at least one --query\n{SEARCH.usage()}")
    logging.set_verbosity(logging.WARNING)
    print(json.dumps(search_texts(values.index, values.query, checkpoint=values.checkpoint,
                                  tokenizer=values.tokenizer, top_k=values.top_k), indent=1))


_INPUT = "(--images DIR | --annotations FILE [--image_root DIR] | --arrayrecord PREFIX | --tfds NAME:SPLIT)"
_INPUTS = {"caption": _INPUT, "embed": _INPUT, "capfilt": "--images DIR or --annotations FILE",
           "answer": "--annotations FILE, --arrayrecord PREFIX or --tfds NAME:SPLIT"}
COMMANDS = {
    "caption": Command(("infer", "caption"), f"--checkpoint DIR_OR_HUB_ID {_INPUT} --out DIR [--prompt TEXT]",
                       "Captions every image of a set into Parquet shards, resumable.", _flags("caption"),
                       _run("caption")),
    "answer": Command(("infer", "answer"), "--checkpoint DIR_OR_HUB_ID (--annotations FILE [--image_root DIR] | "
                      "--arrayrecord PREFIX | --tfds NAME:SPLIT) --out DIR [--prompt TEMPLATE]",
                      "Answers every record's question into Parquet shards, resumable.", _flags("answer"),
                      _run("answer")),
    "embed": Command(("infer", "embed"), f"--checkpoint DIR_OR_HUB_ID {_INPUT} --out DIR [--feature NAME]",
                     "Writes an image feature of every image of a set to .npy shards, resumable.", _flags("embed"),
                     _run("embed")),
    "capfilt": Command(("infer", "capfilt"), "--checkpoint DIR_OR_HUB_ID --ranker DIR_OR_HUB_ID "
                       "(--images DIR | --annotations FILE [--image_root DIR]) --out DIR [--num_captions 10 --keep 2]",
                       "Recaptions a set as BLIP-2's CapFilt: sampled captions ranked by ITC with the images' own, "
                       "the best kept in an annotation file training reads.", _flags("capfilt"), _run("capfilt")),
}
SEARCH = Command(("infer", "search"), "--index DIR --query TEXT [--query TEXT ...] [--top_k 10]",
                 "Ranks the images of an ITC index (infer embed --feature itc_image) for text queries.",
                 _search_flags, _search)
COMMANDS["search"] = SEARCH
