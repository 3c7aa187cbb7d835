"""A tiny random-weight Idefics3 (SmolVLM architecture) vision-language model, built offline in seconds.

``python scripts/tiny_vlm.py OUT_DIR`` writes the model, tokenizer, image processor and chat
template to ``OUT_DIR``. vLLM on the CPU loads it without torchvision (Idefics3 is one of the
architectures whose processor does not need it), and so does transformers. It is the model the
real-vLLM test tier serves, and the model ``make demo`` serves when the Hugging Face Hub cannot
be reached.

Its weights are random: it writes noise. What it exercises is real all the same: loading, chat
templating, image preprocessing (4 image tokens per image), generation (attention heads of 32,
the smallest vLLM's CPU attention takes), and guided decoding, which makes even noise follow the
requested JSON schema.

One thing is not left to chance: like a trained model, it never writes its own special tokens
(``<image>``, ``<row_1_col_1>``, ...). Guided decoding treats them as text, but the server drops
them from the answer (``skip_special_tokens``), so a random model that wrote them would hand the
client strings the grammar never saw. Every text position carries a constant in hidden
dimension 0 that no layer writes to, and the special tokens' output rows weigh it strongly
negative.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

# what the model is called when it is served (vLLM's --served-model-name)
SERVED_NAME = "tiny-idefics3"
IMAGE_SIZE = 32  # the vision tower's input; patches of 8 -> 16 patches -> 4 tokens after pixel shuffle (scale factor 2)
SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<end_of_utterance>",
    "<fake_token_around_image>",
    "<image>",
    "<global-img>",
    *[f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)],
]
# SmolVLM's template, which also takes a plain string as a message's content (vLLM passes system turns that way)
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}"
    "{% else %}{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
# the tokenizer learns its merges from this text: JSON, QA wording and the tag pers_qa uses
CORPUS = [
    '{"qa_pairs": [{"question": "What is shown in the image?", "answer": "A red square on a white background."}]}',
    '{"answer": "<mam> is wearing a blue jacket and smiling."}',
    '{"action": "recruit", "reason": "The set lacks questions about emotion.", "expert": {"role": "Emotion analyst"}}',
    '{"qa": [{"labels": ["visual_understanding"], "question": "Which colours dominate?", "answer": "Red and white."}]}',
    "User: Generate question answer pairs about the video clips. Answer with JSON only.<end_of_utterance>\nAssistant:",
]


def tokenizer(vocab_size: int = 512) -> Any:
    """The model's tokenizer: a byte-level BPE trained on ``CORPUS``, with Idefics3's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(CORPUS * 50, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_idefics3(folder: Path, *, seed: int = 0, max_positions: int = 32768) -> Path:
    """Write a random-weight Idefics3 model with its processor to ``folder`` and return ``folder``."""
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor, LlamaConfig
    from transformers.models.idefics3 import Idefics3ImageProcessorPil

    tok = tokenizer()
    text = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": IMAGE_SIZE,
        "patch_size": 8,
    }
    config = Idefics3Config(
        vision_config=vision,
        text_config=text.to_dict(),
        scale_factor=2,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,  # type: ignore[call-arg]  # a text-config key Idefics3Config passes on
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config).eval()
    _never_write_special_tokens(model, [tok.convert_tokens_to_ids(t) for t in SPECIAL if t != "<end_of_utterance>"])
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=False,
        size={"longest_edge": IMAGE_SIZE},
        max_image_size={"longest_edge": IMAGE_SIZE},
    )
    image_tokens = (IMAGE_SIZE // 8) ** 2 // 4
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tok, image_seq_len=image_tokens, chat_template=CHAT_TEMPLATE
    )
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    # vLLM reads the chat template from the tokenizer's files as well as the processor's
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (folder / "tiny_vlm.json").write_text(
        json.dumps({"built_by": "scripts/tiny_vlm.py", "seed": seed, "random_weights": True}) + "\n"
    )
    return folder


def _never_write_special_tokens(model: object, token_ids: list[int]) -> None:
    """Pin hidden dimension 0 of every text position to a constant and make ``token_ids`` weigh it at -10 (logit about -80)."""
    import torch

    text_model = model.model.text_model  # type: ignore[attr-defined]
    with torch.no_grad():
        text_model.embed_tokens.weight[:, 0] = 1.0
        for layer in text_model.layers:  # no layer adds to dimension 0, so after the final norm it is large and positive
            layer.self_attn.o_proj.weight[0, :] = 0.0
            layer.mlp.down_proj.weight[0, :] = 0.0
        head = model.lm_head.weight  # type: ignore[attr-defined]
        head[:, 0] = 0.0
        head[token_ids, 0] = -10.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(build_tiny_idefics3(args.folder, seed=args.seed))


if __name__ == "__main__":
    main()
