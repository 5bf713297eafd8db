// Owning smart pointers for the GLib/GObject handles treeflash uses.
// Every C handle gets one alias here; no code calls *_unref by hand.
#pragma once

#include <gio/gio.h>
#include <memory>
#include <string>

namespace treeflash::glib {

struct ObjectUnref {
    void operator()(gpointer p) const { g_object_unref(p); }
};
struct VariantUnref {
    void operator()(GVariant* v) const { g_variant_unref(v); }
};
struct Free {
    void operator()(gpointer p) const { g_free(p); }
};
struct ChecksumFree {
    void operator()(GChecksum* c) const { g_checksum_free(c); }
};

struct KeyFileUnref {
    void operator()(GKeyFile* k) const { g_key_file_unref(k); }
};
struct PtrArrayUnref {
    void operator()(GPtrArray* a) const { g_ptr_array_unref(a); }
};
struct HashTableUnref {
    void operator()(GHashTable* h) const { g_hash_table_unref(h); }
};
struct TimeZoneUnref {
    void operator()(GTimeZone* z) const { g_time_zone_unref(z); }
};
struct DateTimeUnref {
    void operator()(GDateTime* d) const { g_date_time_unref(d); }
};
struct StrvFree {
    void operator()(char** v) const { g_strfreev(v); }
};
struct ErrorFree {
    void operator()(GError* e) const { g_error_free(e); }
};
struct MainContextUnref {
    void operator()(GMainContext* c) const { g_main_context_unref(c); }
};
struct MainLoopUnref {
    void operator()(GMainLoop* l) const { g_main_loop_unref(l); }
};
// A source is destroyed (detached from its context) as well as unreferenced.
struct SourceDestroy {
    void operator()(GSource* s) const
    {
        g_source_destroy(s);
        g_source_unref(s);
    }
};
// A list of GUri (soup_server_get_uris).
struct UriListFree {
    void operator()(GSList* l) const { g_slist_free_full(l, reinterpret_cast<GDestroyNotify>(g_uri_unref)); }
};

template <typename T>
using Object = std::unique_ptr<T, ObjectUnref>;
using KeyFile = std::unique_ptr<GKeyFile, KeyFileUnref>;
using PtrArray = std::unique_ptr<GPtrArray, PtrArrayUnref>;
using HashTable = std::unique_ptr<GHashTable, HashTableUnref>;
using TimeZone = std::unique_ptr<GTimeZone, TimeZoneUnref>;
using DateTime = std::unique_ptr<GDateTime, DateTimeUnref>;
using ErrorPtr = std::unique_ptr<GError, ErrorFree>;
using Variant = std::unique_ptr<GVariant, VariantUnref>;
using CString = std::unique_ptr<char, Free>;
using Bytes = std::unique_ptr<guchar, Free>;
using Checksum = std::unique_ptr<GChecksum, ChecksumFree>;
using Strv = std::unique_ptr<char*, StrvFree>;
using MainContext = std::unique_ptr<GMainContext, MainContextUnref>;
using MainLoop = std::unique_ptr<GMainLoop, MainLoopUnref>;
using Source = std::unique_ptr<GSource, SourceDestroy>;
using UriList = std::unique_ptr<GSList, UriListFree>;

// Adopts a floating or full reference (g_variant_ref_sink).
inline Variant adopt_variant(GVariant* v)
{
    return Variant(v ? g_variant_ref_sink(v) : nullptr);
}

inline std::string take_string(char* s)
{
    CString owned(s);
    return owned ? std::string(owned.get()) : std::string();
}

} // namespace treeflash::glib
