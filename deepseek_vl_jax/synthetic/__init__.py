"""A synthetic visual-question-answering set (shapes, colours, counts, sides, sizes) and its tokenizer: the data
that trains the small demo model shipped with the repository."""

from deepseek_vl_jax.synthetic.dataset import write_dataset
from deepseek_vl_jax.synthetic.questions import QUESTION_KINDS, ask
from deepseek_vl_jax.synthetic.scenes import COLORS, SHAPES, Scene, draw, random_scene
from deepseek_vl_jax.synthetic.tokenizer import write_processor

__all__ = ["COLORS", "QUESTION_KINDS", "SHAPES", "Scene", "ask", "draw", "random_scene", "write_dataset",
           "write_processor"]
