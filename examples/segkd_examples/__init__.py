"""The segkd training pipeline: models and datasets (``models``, ``data``), and the DDP trainer around them.

Scripts in ``examples/`` put this folder's parent on ``sys.path``; the package is not installed with segkd.
"""
