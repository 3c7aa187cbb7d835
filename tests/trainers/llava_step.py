"""Run in the training tier's TRL environment (.venv-trl): a ``llava`` export through the tiny model's processor, and one optimizer step.

``python llava_step.py <llava json> <image folder> <model folder>``: reads the file as LLaVA's
loader does (``image_folder`` joined with each ``image``; the ``<image>`` lines of the first human
turn stand for the images, in order), builds each conversation with the model's chat template
and processor (which refuses a sample whose placeholders do not match its images), trains one
AdamW step over every sample and computes each sample's loss. Prints one JSON line. Standalone:
it imports nothing of the project.
"""

import json
import math
import os
import sys

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

IMAGE = "<image>"


def conversation(item: dict) -> list[dict]:
    """LLaVA's turns as chat messages: each ``<image>`` of a human turn becomes an image part where it stands."""
    messages = []
    for turn in item["conversations"]:
        if turn["from"] == "human":
            parts = []
            for k, text in enumerate(turn["value"].split(IMAGE)):
                if k:
                    parts.append({"type": "image"})
                if text.strip():
                    parts.append({"type": "text", "text": text.strip()})
            messages.append({"role": "user", "content": parts})
        else:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": turn["value"]}]})
    return messages


def main(path: str, image_folder: str, model_dir: str) -> None:
    with open(path, encoding="utf-8") as handle:
        items = json.load(handle)
    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    batches = []
    for item in items:
        files = item["image"] if isinstance(item["image"], list) else [item["image"]]
        images = [Image.open(os.path.join(image_folder, name)).convert("RGB") for name in files]
        text = processor.apply_chat_template(conversation(item), add_generation_prompt=False)
        batch = processor(text=[text], images=[images], return_tensors="pt")
        batch["labels"] = batch["input_ids"].clone()
        batches.append(batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    step_loss = sum(model(**batch).loss for batch in batches) / len(batches)
    step_loss.backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        losses = [float(model(**batch).loss) for batch in batches]
    print(
        json.dumps(
            {
                "trainer": "llava through the model's processor",
                "samples": len(items),
                "steps": 1,
                "step_loss": float(step_loss),
                "sample_losses": losses,
            }
        )
    )
    assert all(math.isfinite(x) for x in [float(step_loss), *losses])


if __name__ == "__main__":
    main(*sys.argv[1:4])
