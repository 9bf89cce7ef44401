"""tuneserve's training core: data -> model -> plan -> train -> checkpoint -> evaluate.

Knows nothing of Celery, HTTP or the database; the caller passes a Progress callback.

    from workers.training import TrainingRun, run_training
    outcome = run_training(TrainingRun(job_id=..., tenant=..., base_model_ref=..., spec=TrainingSpec(),
                                       train_conversations=[[{"role": "user", ...}, ...]], work_dir=...),
                           progress)
"""
from service.core.checkpoints import list_checkpoints
from workers.training.recipe import NullProgress, Progress, TrainingOutcome, TrainingRun, run_training

__all__ = ["NullProgress", "Progress", "TrainingOutcome", "TrainingRun", "list_checkpoints", "run_training"]
