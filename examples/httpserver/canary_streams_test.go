package main

import (
	"context"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/graceful-go/graceful/internal/loadtest"
)

// TestStreamsHandedBack: with -stream-handoff and a probation, WebSocket
// and SSE streams opened during the window land on the canary for their
// share. When the canary is rolled back, they go back to the old process,
// connection and all, as keep-alive connections do: no close, no goodbye,
// every message answered once and in order, every event ID once and in
// order. And the rolled-back canary, its streams handed back, exits at
// once, not at its drain deadline, so the upgrade's outcome comes at once.
func TestStreamsHandedBack(t *testing.T) {
	const drainTimeout = 20 * time.Second
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	sock := filepath.Join(t.TempDir(), "control.sock")
	srv := loadtest.StartPackage(t, "github.com/graceful-go/graceful/examples/httpserver", loadtest.Config{Args: []string{
		"-stream-handoff", "-control", sock, "-probation", "20s", "-canary-share", "0.5",
		"-upgrade-timeout", "50s", "-drain-timeout", drainTimeout.String(),
	}})
	old := srv.PID()
	outcome, canary := upgradeToCanary(t, ctx, sock)

	// Streams opened now: half of their connections go to the canary.
	const clients = 20
	streams := newStreamClients(t)
	defer streams.end()
	onCanary := map[string]int{}
	for i := range 2 * clients {
		var c *streamClient
		if i < clients {
			c = streams.ws(ctx, srv.Addr)
		} else {
			c = streams.sse(srv.Addr)
		}
		if c.servedBy == strconv.Itoa(canary) {
			onCanary[c.kind]++
		}
	}
	require.Positive(t, onCanary["ws"], "WebSockets on the canary")
	require.Positive(t, onCanary["sse"], "SSE streams on the canary")
	streams.waitProgress("on probation")

	// Rolled back (it is told to stop: it leaves, and the old process ends
	// the window): its streams come back.
	require.NoError(t, syscall.Kill(canary, syscall.SIGTERM))
	began := time.Now()
	select {
	case err := <-outcome:
		require.ErrorContains(t, err, "rolled back")
	case <-time.After(drainTimeout + 10*time.Second):
		t.Fatal("no outcome")
	}
	took := time.Since(began)
	t.Logf("%d WebSockets and %d SSE streams on the canary; rolled back, outcome after %v", onCanary["ws"], onCanary["sse"], took.Round(time.Millisecond))
	assert.Less(t, took, drainTimeout/2, "the rolled-back canary, its streams handed back, exits at once")
	for i := 0; i < 1000 && loadtest.Alive(canary); i++ {
		time.Sleep(10 * time.Millisecond)
	}
	require.False(t, loadtest.Alive(canary), "the canary exited")
	streams.waitProgress("after the rollback, on the old process")
	assert.Equal(t, old, srv.PID())
	for i, c := range streams.end() {
		assert.NoError(t, c.err, "%s client %d, served by %s", c.kind, i, c.servedBy)
	}
}
