"""Post-training (SFT): instruction data, masked loss, SFT validation, metrics and the LR x seed grid.

The training loop itself is shared with pretraining (`litgpt_ext.train`); this package supplies
what differs for SFT: `data.SFTData` (batches of `input_ids`/`labels`), `loss.sft_loss`
(the `loss_fn(model, batch)` seam), `loss.validate_sft`, `metrics.write_sft_metrics`, `grid`.
"""
