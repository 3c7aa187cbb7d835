"""Run in the training tier's TRL environment (.venv-trl): one optimizer step of TRL's SFTTrainer on an ``hf`` export.

``python trl_sft.py <hf folder> <model folder> <work folder>``: loads the export as a user would
(``datasets.load_dataset(<folder>)``), trains the model one step over every sample at once, then
computes each sample's loss with the trainer's own collator. Prints one JSON line: the samples,
the step's loss, each sample's loss. Standalone: it imports nothing of the project.
"""

import json
import math
import sys

import torch
from datasets import load_dataset
from transformers import AutoModelForImageTextToText, AutoProcessor
from trl import SFTConfig, SFTTrainer, __version__


def main(data: str, model_dir: str, work: str) -> None:
    dataset = load_dataset(data, cache_dir=f"{work}/cache")["train"]
    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    config = SFTConfig(
        output_dir=f"{work}/out",
        max_steps=1,
        per_device_train_batch_size=len(dataset),
        learning_rate=1e-3,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        max_length=None,
        seed=0,
        dataloader_num_workers=0,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=processor)
    result = trainer.train()
    model.eval()
    losses = []
    for example in trainer.train_dataset:
        batch = trainer.data_collator([example])
        with torch.no_grad():
            losses.append(float(model(**{k: v for k, v in batch.items() if k != "labels"}, labels=batch["labels"]).loss))
    print(
        json.dumps(
            {
                "trainer": f"trl {__version__}",
                "samples": len(dataset),
                "steps": result.global_step,
                "step_loss": result.training_loss,
                "sample_losses": losses,
            }
        )
    )
    assert all(math.isfinite(x) for x in [result.training_loss, *losses])


if __name__ == "__main__":
    main(*sys.argv[1:4])
