"""The daily drift monitor: activation, input and prediction statistics of recent traffic against the reference
stored when the champion was calibrated, PSI and KS per feature, and the recalibration trigger."""
