"""Test and validation documents of the evaluation tasks.

The last `VALIDATION_DOCS` documents of each held-out file (`PROSE_VALIDATION_DOCS` of the real
models' 150 prose entries) are its validation documents (the `*_val.yaml` tasks), on which
settings are chosen (WiSE-FT's alpha); the test tasks read all the others, so a reported score
never reads a document that a choice was made on.
"""

VALIDATION_DOCS = 200
PROSE_VALIDATION_DOCS = 50


def test_docs(dataset):
    """Every document but the last `VALIDATION_DOCS`."""
    return dataset.select(range(len(dataset) - VALIDATION_DOCS))


def validation_docs(dataset):
    """The last `VALIDATION_DOCS` documents."""
    return dataset.select(range(len(dataset) - VALIDATION_DOCS, len(dataset)))


def prose_test_docs(dataset):
    """Every prose entry but the last `PROSE_VALIDATION_DOCS`."""
    return dataset.select(range(len(dataset) - PROSE_VALIDATION_DOCS))


def prose_validation_docs(dataset):
    """The last `PROSE_VALIDATION_DOCS` prose entries."""
    return dataset.select(range(len(dataset) - PROSE_VALIDATION_DOCS, len(dataset)))
