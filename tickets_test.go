package graceful

import (
	"crypto/tls"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestTicketKeys: keys rotate when due, newest first, at most
// ticketKeysKept of them; a state passed on is taken whole, and one that
// cannot be read is ignored; install leaves alone a config whose user
// chose otherwise.
func TestTicketKeys(t *testing.T) {
	k := newTicketKeys(time.Hour)
	st := k.state()
	require.Len(t, st.Keys, 1, "a first key, made when first needed")
	assert.Equal(t, st.Keys, k.state().Keys, "not due: the same key")

	// Due: a new key in front, the old ones kept behind it, 24 at most.
	for range 30 {
		k.mu.Lock()
		k.made = k.made.Add(-2 * time.Hour)
		k.publishLocked()
		k.mu.Unlock()
		k.current()
	}
	st2 := k.state()
	assert.Len(t, st2.Keys, ticketKeysKept)
	assert.NotEqual(t, st.Keys[0], st2.Keys[0])

	// The next process takes them whole.
	next := newTicketKeys(time.Hour)
	next.inherit(st2)
	assert.Equal(t, st2.Keys, next.state().Keys)
	assert.Equal(t, st2.Made, next.state().Made)

	// A clock gone back rotates.
	k.mu.Lock()
	k.made = time.Now().Add(time.Hour)
	k.publishLocked()
	k.mu.Unlock()
	before := k.cfg.Load()
	assert.NotSame(t, before, k.current(), "rotated at the next handshake")
	assert.NotEqual(t, st2.Keys[0], k.state().Keys[0])

	// Keys of the wrong size, or none: fresh keys instead.
	bad := newTicketKeys(time.Hour)
	bad.inherit(&ticketState{Keys: [][]byte{[]byte("short")}, Made: time.Now()})
	assert.Len(t, bad.state().Keys, 1)
	assert.NotEqual(t, st2.Keys[0], bad.state().Keys[0])
	var none *ticketKeys
	none.inherit(st2)
	assert.Nil(t, none.state())

	// install: the user's own choices stand.
	wrap := func(tls.ConnectionState, *tls.SessionState) ([]byte, error) { return nil, nil }
	for _, cfg := range []*tls.Config{{SessionTicketsDisabled: true}, {WrapSession: wrap}, {SessionTicketKey: [32]byte{1}}} {
		k.install(cfg)
		assert.Nil(t, cfg.UnwrapSession)
	}
	cfg := &tls.Config{}
	k.install(cfg)
	assert.NotNil(t, cfg.WrapSession)
	assert.NotNil(t, cfg.UnwrapSession)
}
