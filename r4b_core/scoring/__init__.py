"""Answer extraction and checking after ``</think>``: option letters, option text, numbers and math (math-verify), exact text; used by r4b eval and the training rewards."""
