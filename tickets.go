package graceful

import (
	"crypto/rand"
	"crypto/tls"
	"sync"
	"sync/atomic"
	"time"
)

// This file holds the TLS session ticket keys of the servers Serve runs
// with a TLSConfig: kept by graceful instead of crypto/tls, rotated on
// Options.TicketKeyRotation, and passed to each new process with the
// upgrade, so that a client that resumed its session before an upgrade
// resumes it after (Envoy carries its ticket keys across hot restarts for
// the same reason). Without them every reconnect after an upgrade pays a
// full handshake.

// DefaultTicketKeyRotation is how often the session ticket key rotates when
// Options.TicketKeyRotation is zero.
const DefaultTicketKeyRotation = time.Hour

// ticketKeysKept is how many keys decrypt tickets: the current one and the
// ones before it, a day's worth at the default rotation (crypto/tls's own
// keys rotate daily and are kept a week).
const ticketKeysKept = 24

// ticketKeys are the session ticket keys, newest first.
type ticketKeys struct {
	every time.Duration

	mu   sync.Mutex
	keys [][32]byte
	made time.Time // keys[0]'s birth

	// due is when keys[0] must be replaced (UnixNano), read without mu on
	// every handshake.
	due atomic.Int64

	// cfg holds the keys as crypto/tls uses them; servers encrypt and
	// decrypt their tickets through it (see install).
	cfg atomic.Pointer[tls.Config]
}

// ticketState is what a process passes on of its keys.
type ticketState struct {
	Keys [][]byte  `json:"keys"`
	Made time.Time `json:"made"`
}

func newTicketKeys(every time.Duration) *ticketKeys {
	return &ticketKeys{every: every}
}

// inherit takes the keys the previous process used; it ignores keys of the
// wrong size (a state it cannot read starts fresh keys).
func (k *ticketKeys) inherit(st *ticketState) {
	if k == nil || st == nil {
		return
	}
	var keys [][32]byte
	for _, b := range st.Keys {
		if len(b) != 32 || len(keys) == ticketKeysKept {
			continue
		}
		keys = append(keys, [32]byte(b))
	}
	if len(keys) == 0 {
		return
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	k.keys, k.made = keys, st.Made
	k.publishLocked()
}

// state returns the keys to pass on, after rotating them if due.
func (k *ticketKeys) state() *ticketState {
	if k == nil {
		return nil
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	k.rotateLocked(time.Now())
	st := &ticketState{Made: k.made}
	for _, key := range k.keys {
		st.Keys = append(st.Keys, key[:])
	}
	return st
}

// current returns the config holding the keys, rotated if due.
func (k *ticketKeys) current() *tls.Config {
	if cfg := k.cfg.Load(); cfg != nil && time.Now().UnixNano() < k.due.Load() {
		return cfg
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	k.rotateLocked(time.Now())
	return k.cfg.Load()
}

// rotateLocked makes a new current key when there is none or the current
// one is older than every (clocks going back count as due).
func (k *ticketKeys) rotateLocked(now time.Time) {
	if len(k.keys) > 0 && now.Sub(k.made) < k.every && !now.Before(k.made) {
		return
	}
	var key [32]byte
	rand.Read(key[:]) // never fails (crypto/rand)
	k.keys = append([][32]byte{key}, k.keys[:min(len(k.keys), ticketKeysKept-1)]...)
	k.made = now
	k.publishLocked()
}

func (k *ticketKeys) publishLocked() {
	cfg := &tls.Config{}
	cfg.SetSessionTicketKeys(k.keys)
	k.cfg.Store(cfg)
	due := k.made.Add(k.every)
	if k.made.After(time.Now()) {
		due = time.Now() // a clock gone back: rotate at the next handshake
	}
	k.due.Store(due.UnixNano())
}

// install makes cfg's server encrypt and decrypt its session tickets with
// these keys. It leaves alone a config whose tickets are disabled, or whose
// SessionTicketKey, WrapSession or UnwrapSession the user set. (Keys set
// with SetSessionTicketKeys cannot be seen: a user who shares keys across
// machines that way sets Options.TicketKeyRotation negative. A config that
// GetConfigForClient returns uses its own keys.)
func (k *ticketKeys) install(cfg *tls.Config) {
	if k == nil || cfg == nil || cfg.SessionTicketsDisabled || cfg.WrapSession != nil || cfg.UnwrapSession != nil {
		return
	}
	//lint:ignore SA1019 deprecated, but a user who set it chose the keys
	if cfg.SessionTicketKey != [32]byte{} {
		return
	}
	cfg.WrapSession = func(cs tls.ConnectionState, ss *tls.SessionState) ([]byte, error) {
		return k.current().EncryptTicket(cs, ss)
	}
	cfg.UnwrapSession = func(identity []byte, cs tls.ConnectionState) (*tls.SessionState, error) {
		// Not decryptable (unknown key, garbage): nil, nil means a full
		// handshake, as crypto/tls does.
		return k.current().DecryptTicket(identity, cs)
	}
}
