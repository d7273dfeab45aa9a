"""Transfer: fine-tune a pretrained checkpoint on labelled data (`mmssl finetune`: cross-entropy from
a zero-shot head, LP-FT, FLYP) and WiSE-FT weight-space ensembles (`mmssl wise`)."""
