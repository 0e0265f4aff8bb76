"""What the assistant knows besides its weights: exact answers from tools (conversions, time zones,
dates, arithmetic), given to the model as passages instead of being guessed."""
