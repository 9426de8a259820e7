"""The ML stack (transformers, PEFT, TRL), imported once, under this module's lock, by every module that uses it.

Flower's simulation runtime imports the ServerApp and the ClientApp from two threads at once.
transformers and TRL resolve their names lazily, and two threads resolving the same lazy module
race ("cannot import name 'SFTConfig' from 'trl'"). Both app modules import this module first:
one import lock, so the second thread waits until the names are resolved. Kept out of the
package's `__init__` so that light commands (`check`, `runs`, `certs`, every `--help`) never load it.
"""

import transformers  # noqa: F401
from peft import PeftModel  # noqa: F401
from trl import SFTConfig, SFTTrainer  # noqa: F401

from flowertune_llm.logs import quiet_progress_bars

quiet_progress_bars()
