package main

import (
	"testing"
	"time"
)

// The demo is the README's main command: it must keep working and report
// zero failures, and the failing build must be rolled back.
func TestDemo(t *testing.T) {
	if err := run(2, 300*time.Millisecond, false, time.Second, true); err != nil {
		t.Fatal(err)
	}
}
