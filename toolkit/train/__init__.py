"""Training loops: backbone pretraining (classification) and VLM stages (align / finetune)."""
