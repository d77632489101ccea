"""Chapter 5-6, BERT: a post-LN transformer encoder pretrained with masked LM (+ next-sentence
prediction) on the pydoc corpus (`bert_mlm`), and fine-tuned for classification (`bert_classifier`,
from a `bert_mlm` checkpoint or from scratch); importing registers them."""

from litlab.chapters.bert import module  # noqa: F401
