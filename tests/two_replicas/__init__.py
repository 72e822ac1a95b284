"""Tests on one app with two replicas of the tiny chat model (tests/configs/lora.yaml), started once for the package:
multi-LoRA and prefix-aware routing (test_lora.py), then requests outliving a killed replica (test_migration.py)."""
