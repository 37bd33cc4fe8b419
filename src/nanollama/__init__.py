"""nanollama core: config, distributed, optim, model, data and monitoring pieces shared by the apps."""
