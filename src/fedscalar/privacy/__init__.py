"""Privacy for scalar-only federated learning: differentially private replies
(`fedscalar.privacy.dp`) with their privacy accounting (`fedscalar.privacy.accounting`)."""
