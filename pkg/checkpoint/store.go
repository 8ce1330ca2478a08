package checkpoint

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
)

// ErrCorrupt marks a checkpoint file that cannot be trusted: truncated or
// malformed JSON, a checksum mismatch, unknown fields or invalid content.
var ErrCorrupt = errors.New("corrupt checkpoint")

// ErrUnsupportedVersion marks a checkpoint file written in a format (apiVersion
// and kind) that this version of the driver does not read.
var ErrUnsupportedVersion = errors.New("unsupported checkpoint version")

// bootIDFile is the kernel's random boot ID, relative to the proc root.
const bootIDFile = "sys/kernel/random/boot_id"

// Store keeps one checkpoint file. All mutations go through Update, which
// serializes them with a mutex; use one Store per file in a process.
type Store struct {
	path, extras string
	mu           sync.Mutex
	// last is the checkpoint as last read or written, with the exact
	// bytes of both files it comes from. A read whose bytes are the same
	// returns a copy of it instead of decoding again: decoding is most
	// of what a Get costs. Comparing the bytes, not the files' size or
	// times, also sees a file replaced behind the Store's back with
	// content of the same length within one timestamp tick.
	last atomic.Pointer[snapshot]
}

// snapshot is a decoded checkpoint and the file contents it was decoded
// from. It is never changed once stored: readers get clones of cp.
type snapshot struct {
	data      []byte
	extras    []byte
	hasExtras bool
	cp        *Checkpoint
}

// matches reports whether the files read now are the ones s came from.
func (s *snapshot) matches(data, extras []byte, hasExtras bool) bool {
	return s != nil && s.hasExtras == hasExtras && bytes.Equal(s.data, data) && bytes.Equal(s.extras, extras)
}

// NewStore returns a Store for the checkpoint file at path and its extras
// file (ExtrasPath). Nothing is read or created until Get or Update is
// called.
func NewStore(path string) *Store {
	return &Store{path: path, extras: ExtrasPath(path)}
}

// Path returns the checkpoint file the Store reads and writes.
func (s *Store) Path() string { return s.path }

// Get reads the file. A missing file is an empty checkpoint (Claims non-nil).
// A file with a bad checksum, truncated JSON, an unknown apiVersion or kind,
// or unknown fields is an error naming the file; nothing is silently dropped.
//
// Get does not wait for a running Update: files are replaced by rename, so it
// sees either the old or the new content. Each call returns a fresh value,
// which the caller may change: it shares nothing with the Store.
func (s *Store) Get() (*Checkpoint, error) {
	cp, _, err := s.read()
	return cp, err
}

// Update reads the checkpoint, calls mutate on it, and if mutate returns nil
// writes the result atomically: a temp file in the same directory (mode 0600),
// write, fsync, rename over the file, fsync the directory. If mutate returns an
// error, Update returns it unchanged and writes nothing. Updates through the
// same Store are serialized; mutate must not call the Store.
func (s *Store) Update(mutate func(*Checkpoint) error) error {
	s.mu.Lock()
	defer s.mu.Unlock()

	cp, oldExtras, err := s.read()
	if err != nil {
		return err
	}
	// A claim that mutate removes keeps its extras until the next Update:
	// a crash between the two writes below leaves the old checkpoint
	// file, which still lists it.
	kept := extrasOf(cp)
	if err := mutate(cp); err != nil {
		return err
	}
	data, inner, err := encode(cp)
	if err != nil {
		return fmt.Errorf("write checkpoint %s: %w", s.path, err)
	}
	newExtras, extrasInner, err := encodeExtras(cp, kept)
	if err != nil {
		return fmt.Errorf("write checkpoint %s: %w", s.extras, err)
	}
	// The extras first: a claim is in the checkpoint file only once its
	// extras are written (Get reads in the other order).
	if newExtras != nil && !bytes.Equal(newExtras, oldExtras) {
		if err := writeFileAtomic(s.extras, newExtras); err != nil {
			return fmt.Errorf("write checkpoint %s: %w", s.extras, err)
		}
	}
	if err := writeFileAtomic(s.path, data); err != nil {
		return fmt.Errorf("write checkpoint %s: %w", s.path, err)
	}
	if newExtras == nil && oldExtras != nil {
		if err := os.Remove(s.extras); err != nil && !errors.Is(err, fs.ErrNotExist) {
			s.last.Store(nil)
			return fmt.Errorf("remove checkpoint %s: %w", s.extras, err)
		}
	}
	s.remember(data, inner, newExtras, extrasInner)
	return nil
}

// remember keeps what Update wrote as the last checkpoint, decoded from
// the written bytes rather than taken from mutate's value: the caller may
// still hold and change that value, and a read of the files gives what
// they hold (a nil Claims map reads as empty, an extras target that is
// not a VFIO driver is dropped), not what mutate set. The envelope was
// built here, so only its data is decoded.
func (s *Store) remember(data, inner, extrasFile, extrasInner []byte) {
	cp, err := decodeWritten(inner, extrasInner)
	if err != nil {
		// Not expected for bytes just encoded; the next read decodes
		// the files and reports what is wrong.
		s.last.Store(nil)
		return
	}
	s.last.Store(&snapshot{data: data, extras: extrasFile, hasExtras: extrasFile != nil, cp: cp})
}

// read returns the checkpoint with its extras and the extras file as read
// (nil when there is none). When both files hold what they held at the last
// read or write, it returns a copy of that checkpoint without decoding.
func (s *Store) read() (*Checkpoint, []byte, error) {
	data, err := os.ReadFile(s.path)
	if errors.Is(err, fs.ErrNotExist) {
		return New(), nil, nil
	}
	if err != nil {
		return nil, nil, fmt.Errorf("read checkpoint: %w", err)
	}
	// After the checkpoint file: Update writes the extras first, so every
	// claim just read has its extras in what is read now.
	ext, extErr := os.ReadFile(s.extras)
	hasExtras := extErr == nil
	if last := s.last.Load(); extErr == nil || errors.Is(extErr, fs.ErrNotExist) {
		if last.matches(data, ext, hasExtras) {
			return last.cp.Clone(), last.extras, nil
		}
	}
	cp, err := Decode(data)
	if err != nil {
		return nil, nil, fmt.Errorf("read checkpoint %s: %w", s.path, err)
	}
	if errors.Is(extErr, fs.ErrNotExist) {
		s.keep(data, nil, cp)
		return cp, nil, nil
	}
	if extErr != nil {
		return nil, nil, fmt.Errorf("read checkpoint: %w", extErr)
	}
	e, err := decodeExtras(ext)
	if err != nil {
		return nil, nil, fmt.Errorf("read checkpoint %s: %w", s.extras, err)
	}
	e.apply(cp)
	s.keep(data, ext, cp)
	return cp, ext, nil
}

// keep stores a copy of cp, just decoded from data and ext, as the last
// checkpoint; the caller goes on with cp itself.
func (s *Store) keep(data, ext []byte, cp *Checkpoint) {
	s.last.Store(&snapshot{data: data, extras: ext, hasExtras: ext != nil, cp: cp.Clone()})
}

// envelope is the on-disk form. Data holds the exact bytes the checksum
// covers.
type envelope struct {
	APIVersion string          `json:"apiVersion"`
	Kind       string          `json:"kind"`
	Checksum   string          `json:"checksum"`
	Data       json.RawMessage `json:"data"`
}

// Encode returns the checkpoint file content for cp: an indented envelope
// whose checksum is the SHA-256 of the data bytes exactly as they appear in
// the result. The fields that go to the extras file (Claim.LastError,
// Device.Attributes) are left out, so that every v1 reader accepts it. A
// nil Claims map is written as no claims. Content that Validate rejects is
// not encoded.
func Encode(cp *Checkpoint) ([]byte, error) {
	file, _, err := encode(cp)
	return file, err
}

// encode is Encode, returning the data bytes inside the file as well.
func encode(cp *Checkpoint) (file, data []byte, err error) {
	if cp == nil {
		return nil, nil, errors.New("nil checkpoint")
	}
	if err := cp.Validate(); err != nil {
		return nil, nil, err
	}
	data, err = json.MarshalIndent(withoutExtras(cp), "  ", "  ")
	if err != nil {
		return nil, nil, fmt.Errorf("encode checkpoint: %w", err)
	}
	return envelopeFile(Kind, data), data, nil
}

// envelopeFile wraps data in the envelope of kind, with its checksum.
func envelopeFile(kind string, data []byte) []byte {
	var b bytes.Buffer
	fmt.Fprintf(&b, "{\n  \"apiVersion\": %s,\n  \"kind\": %s,\n  \"checksum\": %s,\n  \"data\": ",
		jsonString(APIVersion), jsonString(kind), jsonString(checksum(data)))
	b.Write(data)
	b.WriteString("\n}\n")
	return b.Bytes()
}

// Decode parses file content written by Encode. It checks, in this order, the
// apiVersion and kind (ErrUnsupportedVersion), then the envelope, the checksum
// over the raw data bytes and the data itself (ErrCorrupt); unknown fields
// anywhere are an error. LastError and Attributes are read when there
// (versions before the extras file wrote them here).
func Decode(content []byte) (*Checkpoint, error) {
	// Read the type first, leniently, so that a file from another version is
	// reported as such rather than as a field this version does not know.
	var meta struct {
		APIVersion string `json:"apiVersion"`
		Kind       string `json:"kind"`
	}
	if err := json.Unmarshal(content, &meta); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrCorrupt, err)
	}
	if meta.APIVersion != APIVersion || meta.Kind != Kind {
		return nil, fmt.Errorf("%w: apiVersion %q kind %q, want %q %q",
			ErrUnsupportedVersion, meta.APIVersion, meta.Kind, APIVersion, Kind)
	}

	var env envelope
	if err := decodeStrict(content, &env); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrCorrupt, err)
	}
	if len(env.Data) == 0 || string(env.Data) == "null" {
		return nil, fmt.Errorf("%w: no data", ErrCorrupt)
	}
	if sum := checksum(env.Data); sum != env.Checksum {
		return nil, fmt.Errorf("%w: checksum mismatch: file says %q, data hashes to %q",
			ErrCorrupt, env.Checksum, sum)
	}

	return decodeData(env.Data)
}

// decodeData decodes the data of a checkpoint file whose envelope was
// checked.
func decodeData(data []byte) (*Checkpoint, error) {
	cp := &Checkpoint{}
	if err := decodeStrict(data, cp); err != nil {
		return nil, fmt.Errorf("%w: data: %w", ErrCorrupt, err)
	}
	if cp.Claims == nil {
		cp.Claims = map[string]*Claim{}
	}
	if err := cp.Validate(); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrCorrupt, err)
	}
	return cp, nil
}

// decodeWritten decodes what Update just wrote, from the data inside the
// envelopes it built: data of the checkpoint file and extras of the extras
// file (nil for none). The result is what a read of the files gives.
func decodeWritten(data, extrasData []byte) (*Checkpoint, error) {
	cp, err := decodeData(data)
	if err != nil {
		return nil, err
	}
	if extrasData != nil {
		e, err := decodeExtrasData(extrasData)
		if err != nil {
			return nil, err
		}
		e.apply(cp)
	}
	return cp, nil
}

// decodeStrict decodes exactly one JSON value, rejecting unknown fields and
// anything after the value.
func decodeStrict(data []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return err
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return errors.New("unexpected content after the JSON value")
	}
	return nil
}

// jsonString returns s as a JSON string literal.
func jsonString(s string) []byte {
	b, _ := json.Marshal(s) // a string always encodes
	return b
}

func checksum(data []byte) string {
	sum := sha256.Sum256(data)
	return hex.EncodeToString(sum[:])
}

// WriteFileAtomic replaces path with data as the checkpoint is written, for
// the driver's other state files.
func WriteFileAtomic(path string, data []byte) error { return writeFileAtomic(path, data) }

// writeFileAtomic replaces path with data so that a crash leaves either the
// old or the new content: temp file in the same directory, fsync, rename,
// fsync of the directory. The temp file is removed on failure. The file
// gets mode 0600, its directory (if created) 0700.
func writeFileAtomic(path string, data []byte) (err error) {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	// CreateTemp opens the file with mode 0600.
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			_ = f.Close()
			_ = os.Remove(tmp)
		}
	}()
	if _, err := f.Write(data); err != nil {
		return err
	}
	if err := f.Sync(); err != nil {
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return err
	}
	return syncDir(dir)
}

// syncDir makes a rename in dir durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	if err := d.Sync(); err != nil {
		_ = d.Close()
		return fmt.Errorf("sync directory %s: %w", dir, err)
	}
	return d.Close()
}

// ReadBootID returns the kernel's boot ID from
// <procRoot>/sys/kernel/random/boot_id, trimmed. procRoot is "/proc" on a
// host.
func ReadBootID(procRoot string) (string, error) {
	path := filepath.Join(procRoot, bootIDFile)
	data, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("read boot ID: %w", err)
	}
	id := strings.TrimSpace(string(data))
	if id == "" {
		return "", fmt.Errorf("read boot ID: %s is empty", path)
	}
	return id, nil
}
