"""Adapters for training frameworks: PyTorch Lightning and Hugging Face Transformers.

Each module imports its framework when it is imported, and says which extra to install when the
framework is missing; ``import basis_stability`` never imports them.

    from basis_stability.integrations.lightning import RecordCallback, OIALRCallback
    from basis_stability.integrations.hf import RecordTrainerCallback, OIALRTrainer
"""
