"""Image QA (seed 002): images -> ``qa_pairs``, a list of ``{"question", "answer"}``."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from vqa_operators.generators.answers import qa_set_model
from vqa_operators.generators.base import Generator, ImageRowOptions, OutputFields, QATextOptions, origin_key


class ImageQAOptions(ImageRowOptions, QATextOptions):
    """Options of the image QA generator."""

    pairs_per_row: int = Field(
        3, ge=1, le=20, title="QA pairs per row", description="Question-answer pairs generated for each row's images."
    )
    output_key: str = Field("qa_pairs", min_length=1, description="output field for the QA pairs")


class ImageQAGenerator(Generator):
    """Sends all of a row's images in one multi-image prompt and returns validated QA pairs."""

    name = "image_qa"
    makes_dataset = True
    Options = ImageQAOptions
    options: ImageQAOptions

    @classmethod
    def output_fields(cls, options: ImageQAOptions) -> OutputFields:
        """A list of {"question", "answer"} in ``output_key``, about the images in ``image_key``."""
        return OutputFields(qa=options.output_key, form="pairs", images=options.image_key)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        pairs = self.options.pairs_per_row
        self.answer_model = qa_set_model("ImageQAAnswer", pairs, self.options.text_limits, min_pairs=pairs)

    async def generate(self, row: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Ask for ``pairs_per_row`` QA pairs about every image of ``row``."""
        opts = self.options
        paths = self.image_paths(row, opts.image_key, opts.max_images_per_row)
        images = await self.media.prepare(paths)
        messages = [
            {"role": "system", "content": self.prompts.render("system")},
            self.user_message(images, self.prompts.render("user", image_count=len(images), pairs=opts.pairs_per_row)),
        ]
        answer = await self.ask(messages, self.answer_model, key=origin_key(row))
        pairs = [pair.model_dump() for pair in answer.qa_pairs]  # type: ignore[attr-defined]
        return {opts.output_key: pairs}, {"images": [img.summary() for img in images]}
