"""tuneserve's training core: a recipe object (recipe.LoRAFinetuneRecipe) whose phases run
setup -> plan memory -> load model -> resume -> train -> save -> evaluate -> cleanup.

Knows nothing of Celery, HTTP or the database; the caller passes a Progress callback.

    from workers.training import TrainingRun, run_training
    outcome = run_training(TrainingRun(job_id=..., tenant=..., base_model_ref=..., spec=TrainingSpec(),
                                       train_conversations=[[{"role": "user", ...}, ...]], work_dir=...),
                           progress)
    outcome.adapter_dir, outcome.adapter (AdapterDraft), outcome.report (TrainingReport)
"""
from service.core.checkpoints import list_checkpoints
from workers.training.recipe import LoRAFinetuneRecipe, NullProgress, Progress, TrainingOutcome, TrainingRun, run_training

__all__ = ["LoRAFinetuneRecipe", "NullProgress", "Progress", "TrainingOutcome", "TrainingRun", "list_checkpoints", "run_training"]
