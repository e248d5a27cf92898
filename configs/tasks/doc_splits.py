"""Test and validation documents of the toy worlds' evaluation tasks.

The last `VALIDATION_DOCS` documents of each held-out file are its validation documents (the
`*_val.yaml` tasks), on which settings are chosen (WiSE-FT's alpha); the test tasks read all
the others, so a reported score never reads a document that a choice was made on.
"""

VALIDATION_DOCS = 200


def test_docs(dataset):
    """Every document but the last `VALIDATION_DOCS`."""
    return dataset.select(range(len(dataset) - VALIDATION_DOCS))


def validation_docs(dataset):
    """The last `VALIDATION_DOCS` documents."""
    return dataset.select(range(len(dataset) - VALIDATION_DOCS, len(dataset)))
