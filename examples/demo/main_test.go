package main

import (
	"testing"
	"time"
)

// The demo is the README's main command: it must keep working and report
// zero failures.
func TestDemo(t *testing.T) {
	if err := run(2, 300*time.Millisecond, false); err != nil {
		t.Fatal(err)
	}
}
