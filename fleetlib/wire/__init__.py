"""The wire contract: modules generated from proto/*.proto (`make proto`) and the
codec between them and the tree model."""
