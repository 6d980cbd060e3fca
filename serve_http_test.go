package graceful

import (
	"net/http"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
)

// TestDecideDrain tables the per-connection rule of the keep-alive
// retirement.
func TestDecideDrain(t *testing.T) {
	drainStart := time.Unix(1000, 0)
	grace := time.Second
	before, after := drainStart.Add(-time.Hour), drainStart.Add(300*time.Millisecond)
	cases := []struct {
		name    string
		c       connView
		handoff bool
		want    drainAction
		at      time.Time
	}{
		{"HTTP/2 is drained by GOAWAY", connView{h2: true, http: http.StateIdle}, false, drainSkip, time.Time{}},
		{"retired already", connView{state: connRetired, http: http.StateIdle}, false, drainSkip, time.Time{}},
		{"read-drain over", connView{state: connDone, http: http.StateIdle}, false, drainSkip, time.Time{}},
		{"being passed on", connView{state: connHanding, http: http.StateIdle}, true, drainSkip, time.Time{}},
		{"passed on", connView{state: connHanded, http: http.StateIdle}, true, drainSkip, time.Time{}},
		{"claimed: wait for Close or a request", connView{state: connClaimed, http: http.StateIdle}, true, drainWait, time.Time{}},
		{"active before the drain: response may offer keep-alive", connView{http: http.StateActive, preDrain: true}, false, drainWait, time.Time{}},
		{"active since the drain: answered with Connection: close", connView{http: http.StateActive}, false, drainSkip, time.Time{}},
		{"active, plain, with successor: passed on when idle", connView{http: http.StateActive}, true, drainWait, time.Time{}},
		{"active, TLS, with successor: answered with Connection: close", connView{http: http.StateActive, tls: true}, true, drainSkip, time.Time{}},
		{"idle, request arriving", connView{state: connSeen, http: http.StateIdle}, false, drainWait, time.Time{}},
		{"new, request arriving, no successor", connView{state: connSeen, http: http.StateNew}, false, drainSkip, time.Time{}},
		{"new, request arriving, successor", connView{state: connSeen, http: http.StateNew}, true, drainWait, time.Time{}},
		{"idle plain, successor: claim", connView{http: http.StateIdle}, true, drainClaim, time.Time{}},
		{"idle TLS, successor: retire", connView{http: http.StateIdle, tls: true, since: before}, true, drainRetire, drainStart.Add(grace)},
		{"idle since before the drain: grace from the drain", connView{http: http.StateIdle, since: before}, false, drainRetire, drainStart.Add(grace)},
		{"idle since the drain: grace from going idle", connView{http: http.StateIdle, since: after}, false, drainRetire, after.Add(grace)},
		{"hijacked: waited for elsewhere", connView{http: http.StateHijacked}, false, drainSkip, time.Time{}},
	}
	for _, c := range cases {
		got, at := decideDrain(c.c, c.handoff, drainStart, grace)
		assert.Equal(t, c.want, got, c.name)
		assert.Equal(t, c.at, at, c.name)
	}
}
