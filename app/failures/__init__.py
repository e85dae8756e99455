"""Failed operations (the dead-letter queue) and the one retry engine that drives them."""
