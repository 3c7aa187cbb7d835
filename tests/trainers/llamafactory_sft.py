"""Run in the training tier's LLaMA-Factory environment (.venv-llamafactory): a ``sharegpt`` export through LLaMA-Factory.

``python llamafactory_sft.py <run folder> <dataset name> <work folder>``: LLaMA-Factory reads the
run folder's ``dataset_info.json`` as its ``dataset_dir`` and the ShareGPT file it registers,
converts and tokenizes every sample with its ``qwen2_vl`` template (whose plugin refuses a sample
whose ``<image>`` / ``<video>`` placeholders do not match its media), then trains one step of
full fine-tuning over every sample at once. The model is a tiny random-weight Qwen2-VL built
here, offline (LLaMA-Factory has no template for the Idefics3 the other trainers use). Prints one
JSON line: the samples, the samples its pipeline kept, the step's loss. Standalone: it imports
nothing of the project.
"""

import json
import math
import sys
from pathlib import Path

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% elif part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "<|im_start|>user\nWhat is shown in the image? Which colours dominate?<|im_end|>\n<|im_start|>assistant\nA red square.<|im_end|>\n"
]


def build_tiny_qwen2vl(folder: Path) -> Path:
    """A tiny random-weight Qwen2-VL: byte-level BPE tokenizer with Qwen2-VL's special tokens, a 2-layer vision tower and text model."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
    )
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    torch.manual_seed(0)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        CORPUS * 50,
        trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_bos_token": "<|vision_start|>",
            "vision_eos_token": "<|vision_end|>",
        },
    )
    pixels = {"shortest_edge": 28 * 28, "longest_edge": 56 * 56}
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=pixels, patch_size=14, merge_size=2, temporal_patch_size=2),
        video_processor=Qwen2VLVideoProcessor(size=pixels, patch_size=14, merge_size=2, temporal_patch_size=2),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in SPECIAL}
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 8192,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": 64,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    Qwen2VLForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def main(run: str, dataset: str, work: str) -> None:
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.extras.env import VERSION
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer
    from llamafactory.train.tuner import run_exp

    model = build_tiny_qwen2vl(Path(work) / "tiny-qwen2vl")
    registered = json.loads((Path(run) / "dataset_info.json").read_text())[dataset]
    samples = len(json.loads((Path(run) / registered["file_name"]).read_text()))
    config = {
        "model_name_or_path": str(model),
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "full",
        "dataset": dataset,
        "dataset_dir": run,
        "template": "qwen2_vl",
        "cutoff_len": 8192,
        "max_steps": 1,
        "per_device_train_batch_size": samples,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1e-3,
        "output_dir": f"{work}/out",
        "overwrite_output_dir": True,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "bf16": False,
        "fp16": False,
        "use_cpu": True,
        "overwrite_cache": True,
        "dataloader_num_workers": 0,
        "image_max_pixels": 56 * 56,
        "video_max_pixels": 56 * 56,
        "plot_loss": False,
        "seed": 0,
    }
    # LLaMA-Factory's pipeline on its own first: every sample converted and tokenized, none dropped
    model_args, data_args, training_args, _, _ = get_train_args(dict(config))
    tokenizer_module = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
    kept = len(get_dataset(template, model_args, data_args, training_args, stage="sft", **tokenizer_module)["train_dataset"])
    # then one training step, through its own entry point
    run_exp(dict(config))
    logged = [json.loads(line) for line in (Path(work) / "out" / "trainer_log.jsonl").read_text().splitlines()]
    losses = [entry["loss"] for entry in logged if "loss" in entry]
    print(
        json.dumps(
            {
                "trainer": f"llamafactory {VERSION}",
                "samples": samples,
                "pipeline_kept": kept,
                "steps": len(losses),
                "step_loss": losses[0] if losses else None,
            }
        )
    )
    assert kept == samples and losses and all(math.isfinite(x) for x in losses)


if __name__ == "__main__":
    main(*sys.argv[1:4])
