//go:build race

package graceful_test

const raceEnabled = true
