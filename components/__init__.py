"""The real work: models, data, training, compression, evaluation, retrieval (no orchestration)."""

from components.environment import apply_offline_env

apply_offline_env()
