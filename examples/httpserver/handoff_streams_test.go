package main

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/graceful-go/graceful/internal/loadtest"
)

// TestStreamHandOff: with -stream-handoff, 200 WebSocket and 200 SSE
// clients stay on their connections through 20 upgrades: no close, no
// reconnect, the same client port throughout, every WebSocket message
// answered exactly once and in order, every SSE event ID delivered once
// and in order.
func TestStreamHandOff(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	srv := loadtest.StartPackage(t, "github.com/graceful-go/graceful/examples/httpserver", loadtest.Config{Args: []string{"-stream-handoff"}})
	const clients, upgrades = 200, 20
	streams := newStreamClients(t)
	defer streams.end()
	for range clients {
		streams.ws(ctx, srv.Addr)
	}
	for range clients {
		streams.sse(srv.Addr)
	}

	streams.waitProgress("before the upgrades")
	pids := []int{srv.PID()}
	for i := range upgrades {
		u, err := srv.Upgrade(ctx, time.Minute)
		require.NoError(t, err, "upgrade %d", i+1)
		// Its streams handed over, the old process exits at once, not at
		// its drain deadline (30 s).
		assert.Less(t, u.OldExit, 5*time.Second, "upgrade %d", i+1)
		pids = append(pids, u.NewPID)
	}
	streams.waitProgress("on the last process")
	counts := map[string]int{}
	ports := map[string]bool{}
	for _, c := range streams.end() {
		assert.NoError(t, c.err, "%s client %s", c.kind, c.port)
		assert.False(t, ports[c.port], "one connection per client")
		ports[c.port] = true
		counts[c.kind] += c.messages
	}
	assert.Len(t, ports, 2*clients)
	t.Logf("%d upgrades (PIDs %v): %d WebSocket echoes and %d SSE events checked, on the same %d connections", upgrades, pids, counts["ws"], counts["sse"], len(ports))
	assert.Positive(t, counts["ws"])
	assert.Positive(t, counts["sse"])
}
