"""Training the toy zoo (a developer tool, not installed with lmms-quant).

The installed package keeps the model definitions (:mod:`lmms_quant.zoo.toy_llava`,
:mod:`lmms_quant.zoo.toy_blip2`, :mod:`lmms_quant.zoo.toy_blip2_itm`) and the shipped weights
(``lmms_quant/zoo/models``); this folder holds what builds them, run from a checkout:

* :mod:`tools.zoo.train`: ``python -m tools.zoo.train --model NAME`` (toy-llava, toy-blip2; toy-blip2-itm
  through :mod:`tools.zoo.train_itm`), with the recipes and the stage-2 losses;
* :mod:`tools.zoo.vision`: stage 1 (the vision tower on dense patch labels) and the shared helpers;
* :mod:`tools.zoo.schedule` (learning-rate schedule), :mod:`tools.zoo.tokenizer` (the world's vocabulary);
* :mod:`tools.zoo.scoring` and ``python -m tools.zoo.evaluate --model NAME --rtn``: the zoo's own check of its models.

Layers: vision, schedule, tokenizer and scoring import no trainer; train_itm imports no train; evaluate (the command line) imports both.
"""
