"""Plain modules the tests share where a fixture cannot reach: code run in a child process."""
