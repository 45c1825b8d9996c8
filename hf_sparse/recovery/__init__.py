"""Recovery after pruning: distillation from the dense model (or the LM loss) on transformers' ``Trainer``.

``recover(model, tokenizer, data, objective="distill+lm", teacher="base")`` is the verb (the example and
``hf-sparse recover`` call it). The parts, one per file:

* :mod:`.config` - ``RecoveryConfig`` (objective, teacher, temperature, top-k, loss weights, LoRA or full, steps);
* :mod:`.data` - any calibration source packed into training sequences, with a held-out part;
* :mod:`.losses` - KL and cross-entropy from final hidden states, chunked over tokens; the hidden-state loss;
* :mod:`.teacher` - the teacher found (``"base"`` = the record's base model, hash-checked), checked and frozen;
* :mod:`.trainer` - ``RecoveryTrainer``, a ``transformers.Trainer`` whose ``compute_loss`` distils;
* :mod:`.mask_keeper` - the zeros of a masked student kept through full fine-tuning (public as
  :mod:`hf_sparse.training`);
* :mod:`.api` - ``recover()`` and ``correct_teacher()`` (Minitron's teacher correction).

>>> from hf_sparse.recovery import RecoveryConfig, recover
>>> RecoveryConfig().objective
'distill+lm'
"""

from .api import RecoveryResult, correct_teacher, recover
from .config import METHODS, OBJECTIVES, RecoveryConfig
from .data import TrainingData, pack_training_data
from .losses import chunked_recovery_loss, hidden_state_loss
from .teacher import Teacher, load_teacher
from .trainer import NonFiniteLossError, RecoveryTrainer

__all__ = ["METHODS", "NonFiniteLossError", "OBJECTIVES", "RecoveryConfig", "RecoveryResult", "RecoveryTrainer",
           "Teacher", "TrainingData", "chunked_recovery_loss", "correct_teacher", "hidden_state_loss", "load_teacher",
           "pack_training_data", "recover"]
